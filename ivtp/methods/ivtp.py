"""IVTP's stage 1 as a runner: GTP inside the CLIP tower (ivtp/patch/clip.py). Stage 2 lives in the LLM."""

from __future__ import annotations

from ivtp.methods import register
from ivtp.methods.base import VisionRunner
from ivtp.patch.clip import VisionPlan, make_vision_plan, passthrough_plan, prune_vision_tower, tower_patches


class GTPRunner(VisionRunner):
    def __init__(self, plan: VisionPlan):
        self.plan = plan
        self.num_patches = plan.num_patches
        self.tokens_per_image = plan.keep
        self.layers_used = plan.layers_used

    def step_names(self) -> list[str]:
        return self.plan.step_names()

    @classmethod
    def passthrough(cls, tower_config, feature_layer: int) -> "GTPRunner":
        """Every patch goes through (stage 1 off, or a method that prunes only inside the LLM)."""
        return cls(passthrough_plan(tower_config.num_hidden_layers, feature_layer, tower_patches(tower_config)))

    def run(self, tower, pixel_values, want_final_cls):
        return prune_vision_tower(tower, pixel_values, self.plan, want_final_cls)

    def vit_tokens_per_layer(self) -> list[int]:
        """A group runs at the count the previous group left; pruning follows its top layer."""
        out, current = [], self.num_patches
        for (lo, hi), count in zip(self.plan.groups, self.plan.counts):
            out += [current + 1] * (hi - lo + 1)
            current = count
        return out


@register("ivtp")
def build(config, tower_config, feature_layer: int) -> GTPRunner:
    if not config.vision.enabled:
        return GTPRunner.passthrough(tower_config, feature_layer)
    return GTPRunner(make_vision_plan(config.vision, tower_config.num_hidden_layers, feature_layer,
                                      tower_patches(tower_config)))
