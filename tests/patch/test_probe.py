"""The record a pruning loop shares with a layer survives accelerate's device moves."""

import torch
from accelerate.utils import send_to_device

from ivtp.patch.probe import Probe


def test_send_to_device_keeps_the_object_and_moves_its_tensors():
    cos, sin = torch.zeros(2, 3), torch.ones(2, 3)
    probe = Probe(mode="full", rows=torch.arange(2), rope=(cos, sin), scratch=None)
    moved = send_to_device({"ivtp_probe": probe}, torch.device("meta"))["ivtp_probe"]
    assert moved is probe  # what the layer writes reaches the loop
    assert probe["rows"].device.type == "meta" and all(t.device.type == "meta" for t in probe["rope"])
    assert probe["mode"] == "full" and probe["scratch"] is None


def test_dict_style_access():
    probe = Probe(mode="row")
    probe["attn"] = 1
    probe.update({"vnorm": 2})
    assert "attn" in probe and "keys" not in probe
    assert (probe["attn"], probe.get("vnorm"), probe.get("keys", 3)) == (1, 2, 3)
    assert repr(probe) == "Probe(mode, attn, vnorm)"
