"""Checkpoints: round trip, path forms, and refusal of broken pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from demhx_export.checkpoint import (
    FORMAT_VERSION,
    checkpoint_paths,
    load_checkpoint,
    optimiser_state_path,
    save_checkpoint,
)
from demhx_export.network import UNet3D, count_parameters


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(tmp_path: Path, tiny_net: UNet3D, tiny_config: dict[str, object]) -> None:
    info = {**tiny_config, "best_val_l1": float("inf"), "lr": np.float32(0.5),
            "data_dir": tmp_path, "widths": (4, 8, 16)}
    written = save_checkpoint(tmp_path / "run" / "best", tiny_net, info)
    assert written == tmp_path / "run" / "best.json"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.json",
                                                                     "best.safetensors"]
    net, config = load_checkpoint(tmp_path / "run" / "best")
    assert _same_weights(net, tiny_net) and not net.training
    assert net.widths == (4, 8, 16)
    assert config["format_version"] == FORMAT_VERSION
    assert config["architecture"]["widths"] == [4, 8, 16]
    assert config["architecture"]["parameters"] == count_parameters(tiny_net)
    assert config["train"]["cube_size"] == 16 and config["step"] == 120
    assert config["best_val_l1"] is None  # strict JSON: inf becomes null
    assert config["lr"] == 0.5 and config["data_dir"] == str(tmp_path)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), tiny_net(x), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["best", "best.json", "best.safetensors", "."])
def test_path_forms(tmp_path: Path, tiny_net: UNet3D, form: str) -> None:
    save_checkpoint(tmp_path / "best", tiny_net)
    save_checkpoint(tmp_path / "latest", UNet3D((4, 8, 16)))
    net, _ = load_checkpoint(tmp_path / form)  # a folder means its best checkpoint
    assert _same_weights(net, tiny_net)


def test_paths_of_a_checkpoint(tmp_path: Path) -> None:
    expected = (tmp_path / "a.b.safetensors", tmp_path / "a.b.json")
    for form in ("a.b", "a.b.json", "a.b.safetensors", "a.b.opt.pt"):
        assert checkpoint_paths(tmp_path / form) == expected
    assert optimiser_state_path(tmp_path / "a.b.json") == tmp_path / "a.b.opt.pt"


def test_resave_replaces_both_files(tmp_path: Path, tiny_net: UNet3D) -> None:
    save_checkpoint(tmp_path / "latest", UNet3D((4, 8, 16)), {"step": 1})
    save_checkpoint(tmp_path / "latest", tiny_net, {"step": 2})
    net, config = load_checkpoint(tmp_path / "latest")
    assert config["step"] == 2 and _same_weights(net, tiny_net)
    assert not list(tmp_path.glob("*.tmp"))


def test_mismatched_pair_is_refused(tmp_path: Path, tiny_net: UNet3D) -> None:
    save_checkpoint(tmp_path / "a", tiny_net)
    save_checkpoint(tmp_path / "b", UNet3D((4, 8, 16)))
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(tmp_path / "a")


def test_weights_of_another_architecture_are_refused(tmp_path: Path, tiny_net: UNet3D) -> None:
    save_checkpoint(tmp_path / "a", tiny_net)
    config = json.loads((tmp_path / "a.json").read_text())
    config["architecture"]["widths"] = [4, 8, 8]
    config["weights"]["sha256"] = ""  # an older writer without a checksum
    (tmp_path / "a.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(tmp_path / "a")


def test_missing_and_foreign_files(tmp_path: Path, tiny_net: UNet3D) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(tmp_path / "a", tiny_net)
    (tmp_path / "a.json").write_text('{"widths": [4, 8, 16]}')
    with pytest.raises(ValueError, match="not a demhx-export checkpoint"):
        load_checkpoint(tmp_path / "a")


def test_reserved_info_keys_are_refused(tmp_path: Path, tiny_net: UNet3D) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "a", tiny_net, {"architecture": "mine"})
    assert not list(tmp_path.iterdir())


def test_round_trip_keeps_the_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = UNet3D((4, 8, 8), norm="none").eval()
    save_checkpoint(tmp_path / "plain", plain, {"step": 1})
    net, config = load_checkpoint(tmp_path / "plain")
    assert net.norm == "none" and config["architecture"]["norm"] == "none"
    assert _same_weights(net, plain)
