"""The image defences as deployments: one registered `Deployment` (modality "image") per defence of
`IMAGE_DEFENCES`, each a split CNN whose edge runs the defence and whose cloud receives the defended features."""

from __future__ import annotations

from splitveil.plan.plan import Placement
from splitveil.protect.deployment import DEPLOYMENTS, Deployment, device, honest_cloud
from splitveil.protect.image.base import IMAGE_DEFENCES


def _register_image_defences() -> None:
    for name in IMAGE_DEFENCES:
        if name == "none":
            continue
        defence = IMAGE_DEFENCES.get(name)
        DEPLOYMENTS.register(type(f"{name.capitalize()}ImageDeployment", (Deployment,), {
            "__module__": __name__, "name": name, "modality": "image", "placement": (Placement.EDGE, Placement.CLOUD),
            "summary": f"a split CNN with the `{name}` defence at the cut: {defence.description}",
            "protects": "the input image, as far as the strongest reconstruction attack fails",
            "parties": (device("the image and the edge part (blocks before the cut"
                               + (", its last block replaced by the defence's funnel" if defence.replaces_edge_block
                                  else ", with the defence's layers") + ")"),
                        honest_cloud("the cloud part (trained with the defence) and every feature map the edge sends; "
                                     "as the model's owner it also knows the edge's weights")),
            "assumptions": ("the cloud owns the model: it knows the edge's weights (white-box rMLE) and has auxiliary "
                            "images of its own",),
            "attacker": {"command": f"splitveil attack image --defence {name}",
                         "attacks": ["inverse", "rmle", "shadow", "cgan"],
                         "adaptation": "learned attackers trained on the defended edge's features until their "
                                       "held-out loss plateaus; rMLE optimises through the defended edge"},
        }))


_register_image_defences()
