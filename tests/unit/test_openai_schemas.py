"""The OpenAI edge's request schemas take each field only in its JSON type (found by `bench fuzz --target edge`:
pydantic's lax mode served `"stream": "yes"` as a stream, `"max_tokens": "5"` and `true` as numbers, `[true]` as a
token-id prompt)."""

import pytest
from pydantic import ValidationError

from splitveil.edge.openai.schemas import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
TEXT = {"model": "m", "prompt": [1, 2, 3]}


@pytest.mark.parametrize("schema, base, change", [
    (CompletionRequest, TEXT, {"max_tokens": "5"}),
    (CompletionRequest, TEXT, {"max_tokens": True}),
    (CompletionRequest, TEXT, {"stream": "yes"}),
    (CompletionRequest, TEXT, {"stream": 1}),
    (CompletionRequest, TEXT, {"prompt": [True, False]}),
    (CompletionRequest, TEXT, {"temperature": "0"}),
    (CompletionRequest, TEXT, {"seed": True}),
    (CompletionRequest, TEXT, {"stream": True, "stream_options": {"include_usage": "yes"}}),
    (ChatCompletionRequest, CHAT, {"max_completion_tokens": True}),
    (ChatCompletionRequest, CHAT, {"logprobs": "x"}),
    (ChatCompletionRequest, CHAT, {"messages": [{"role": "user", "content": "x", "name": 5}]}),
])
def test_a_field_of_the_wrong_json_type_is_refused(schema, base, change):
    with pytest.raises(ValidationError):
        schema.model_validate({**base, **change})


def test_json_types_are_still_taken_as_the_api_gives_them():
    request = CompletionRequest.model_validate({**TEXT, "temperature": 0, "top_p": 1, "max_tokens": 4, "stream": True,
                                                "stream_options": {"include_usage": True}, "seed": 2**64 - 1, "x_unknown": [1]})
    assert request.temperature == 0.0 and request.top_p == 1.0 and request.include_usage
    chat = ChatCompletionRequest.model_validate({**CHAT, "stop": ["a"], "user": "u", "response_format": {"type": "text"}})
    assert chat.messages[0].text() == "hi" and chat.stop_strings == ("a",)
