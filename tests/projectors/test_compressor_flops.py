"""The compressors' FLOPs (ivtp.eval.flops.compressor_flops): against torch's FLOP counter on the modules
themselves, and against IVTP's Table 9 at 7B."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ivtp.cli import main
from ivtp.eval.flops import Arch, compressor_flops, compressor_llava_flops, llava_flops
from ivtp.projectors import build_projector

SMALL = Arch(vision_hidden=32, vision_intermediate=64, vision_layers=2, vision_heads=2, image_size=112,
             patch_size=14, llm_hidden=48, llm_intermediate=96, llm_layers=2, llm_heads=2, llm_kv_heads=2,
             vocab=100, projector_hidden=48)


@pytest.mark.parametrize("name, options", [("honeybee", {}), ("qwen_vl", {}), ("qwen_vl", {"width": 64}),
                                           ("llama_vid", {"layers": 3})])
def test_priced_flops_equal_the_modules_counted_flops(name, options):
    module = build_projector(name, 32, 48, num_tokens=16, num_patches=64, **options).eval()
    x = torch.randn(1, 64, 32)
    args = (x, torch.randn(1, 7, 48), torch.ones(1, 7, dtype=torch.bool)) if name == "llama_vid" else (x,)
    # The math kernel runs attention as matmuls the counter sees (it has no rule for the CPU's fused kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args)
    priced = compressor_flops(SMALL, name, 16, instruction_tokens=7, **options)
    assert priced["compressor"] + priced["readout"] == counter.get_total_flops()
    assert priced["tokens_per_image"] == module.tokens_per_image


def test_qwen_vl_at_7b_matches_table_9s_extra_column():
    arch = Arch.llava_1_5_7b()
    out = compressor_llava_flops(arch, "qwen_vl", 512)
    assert round(out["extra"], 3) == 0.003  # Table 9: Qwen-VL 0.003 TFLOPs
    assert out["llm"] == llava_flops(arch, 512, llm_visual_per_layer=[64] * 32)["llm"]
    assert out["vit"] == llava_flops(arch, 512)["vit"]  # the whole tower runs
    vid = compressor_llava_flops(arch, "llama_vid", 512)
    assert vid["final_visual_tokens"] == 65 and vid["extra"] > out["extra"]  # its Q-Former reads the instruction


def test_flops_cli_prices_a_projector_and_refuses_a_method_beside_it(capsys):
    assert main(["flops", "--projector", "honeybee"]) == 0
    assert "honeybee@64" in capsys.readouterr().out
    assert main(["flops", "--projector", "honeybee", "--method", "topk"]) == 2
    assert "prices the unpruned model" in capsys.readouterr().err
