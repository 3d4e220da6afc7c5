"""Registry: named items, duplicates rejected, unknown names explained, decorator form."""

from __future__ import annotations

from enum import Enum

import pytest

from splitveil.core.errors import ConfigError, SplitveilError
from splitveil.core.registry import Registry


def test_register_and_get():
    registry: Registry[int] = Registry("number")
    assert registry.register("one", 1) == 1
    registry.register("two", 2)
    assert registry.get("one") == 1
    assert registry.get("two") == 2
    assert len(registry) == 2
    assert "one" in registry and "three" not in registry
    assert registry.names() == ["one", "two"]


def test_names_and_iteration_are_sorted():
    registry = Registry("thing")
    for name in ("zeta", "alpha", "mu"):
        registry.register(name, object())
    assert registry.names() == ["alpha", "mu", "zeta"]
    assert list(registry) == ["alpha", "mu", "zeta"]


def test_duplicates_are_rejected_and_keep_the_first():
    registry = Registry("codec")
    first, second = object(), object()
    registry.register("fp32", first)
    with pytest.raises(ValueError, match="codec 'fp32' is registered twice"):
        registry.register("fp32", second)
    assert registry.get("fp32") is first
    assert len(registry) == 1


def test_duplicate_via_decorator_is_rejected():
    registry = Registry("model")

    @registry.register("a")
    def a():
        return 1

    with pytest.raises(ValueError, match="registered twice"):

        @registry.register("a")
        def other():
            return 2

    assert registry.get("a") is a


def test_unknown_name_raises_config_error_listing_known_names():
    registry = Registry("tiny model family")
    for name in ("qwen2", "llama", "gpt2"):
        registry.register(name, name.upper())
    with pytest.raises(ConfigError) as info:
        registry.get("mamba")
    error = info.value
    assert isinstance(error, SplitveilError) and error.exit_code == 2
    assert error.message == "unknown tiny model family 'mamba'; known: gpt2, llama, qwen2"
    assert "\n" not in str(error)


def test_unknown_name_in_empty_registry():
    with pytest.raises(ConfigError, match="unknown widget 'x'; known: $"):
        Registry("widget").get("x")


def test_decorator_form_returns_the_object_unchanged():
    registry = Registry("factory")

    @registry.register("make")
    def make(x):
        return x * 2

    assert make(3) == 6  # still the plain function
    assert registry.get("make") is make

    @registry.register("Cls")
    class Cls:
        pass

    assert registry.get("Cls") is Cls
    assert registry.names() == ["Cls", "make"]


def test_enum_values_look_up_by_value():
    class Color(str, Enum):
        RED = "red"

    registry = Registry("color")
    registry.register("red", 1)
    assert registry.get(Color.RED) == 1
    assert Color.RED in registry


def test_registries_are_independent():
    a, b = Registry("a"), Registry("b")
    a.register("x", 1)
    assert "x" not in b
    b.register("x", 2)  # no clash across registries
    assert (a.get("x"), b.get("x")) == (1, 2)
