"""The command line: train, evaluate, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from kgshatter.cli import apply_overrides, main
from kgshatter.presets import get_preset


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "train.steps=30",
        "--set",
        "train.eval_every=30",
    ]
    assert main(args) == 0
    assert "direct" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--prefixes", "1", "--no-rings"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["n_prefixes"] == 1 and result["step"] == 30
    assert set(result["accuracy"]) == {"direct", "logical", "compositional"}
    assert set(result["accuracy"]["direct"]) == {"I", "II", "III", "all"}
    assert "ablation" not in result
    capsys.readouterr()
    assert main(["evaluate", str(out), "--no-rings", "--max-queries", "20", "--ablate"]) == 0
    ablation = json.loads((out / "evaluation.json").read_text())["ablation"]
    assert (
        ablation["clean"] == json.loads((out / "evaluation.json").read_text())["accuracy"]["direct"]
    )
    assert "0.attn_out@relation" in ablation and "1.mlp_out@subject" in capsys.readouterr().out
    # which orders share block 0's keys: every order's edits on every order, C cached in the run
    args_ks = ["evaluate", str(out), "--no-rings", "--max-queries", "20", "--key-sharing"]
    assert main(args_ks) == 0
    sharing = json.loads((out / "evaluation.json").read_text())["key_sharing"]
    assert sharing["site"] == "0.mlp_post" and set(sharing["overlap"]) == {"I", "II", "III"}
    assert all(row[o] > 0 for o, row in sharing["overlap"].items())
    cosine = sharing["mean_key_cosine"]
    assert cosine["I"]["II"] == pytest.approx(cosine["II"]["I"]) and -1 <= cosine["I"]["III"] <= 1
    assert "order II edited: I " in capsys.readouterr().out and any((out / "cache").iterdir())
    assert main([*args_ks, "5"]) == 2
    assert "model has layers 0..1" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--max-queries",
                "20",
                "--figure",
                str(out / "r.png"),
                "--site",
                "1.mlp_post",
                "--method",
                "pca",
            ]
        )
        == 0
    )
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--no-rings",
                "--figure",
                str(out / "s.png"),
                "--site",
                "7.mlp_post",
            ]
        )
        == 2
    )
    assert "model has layers 0..1" in capsys.readouterr().err
    assert not (out / "s.png").exists()
    # a point of the learning curve: its own file; a step never saved is one line
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--step",
                "30",
                "--no-rings",
                "--max-queries",
                "20",
            ]
        )
        == 0
    )
    assert json.loads((out / "evaluation_step_30.json").read_text())["step"] == 30
    assert main(["evaluate", str(out), "--step", "7", "--no-rings"]) == 2
    assert "no checkpoint at step 7; it has steps 30" in capsys.readouterr().err
    # the same command again refuses instead of overwriting
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert (
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "train.lr=-1"])
        == 2
    )
    assert "lr must be a finite number > 0" in capsys.readouterr().err
    assert (
        main(
            ["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "kg.n_entities=4"]
        )
        == 2
    )
    assert "max_hops must be < n_entities / 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--preset", "huge", "--out", str(tmp_path / "r")]) == 2
    (line,) = capsys.readouterr().err.splitlines()  # argparse's errors are one line too
    assert "invalid choice: 'huge'" in line and "--help" in line
    # the edited order: a name, and one the graph has (refused before any training)
    repro = ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "p"), "--edit-order"]
    assert main([*repro, "IV"]) == 2
    assert "edit_order must be in 0..2 (the graph's 3 orders), got 3" in capsys.readouterr().err
    assert main([*repro, "second"]) == 2
    assert "expected an order's name (I, II, III, ...), got 'second'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_overrides():
    run = apply_overrides(get_preset("tiny"), ["train.lr=0.01", "kg.seed=3", "model.act_fn=relu"])
    # an integer written for a float field is that float; integer fields stay integers; a
    # field left at None by its preset (a ring graph's width) is named, not a KeyError
    whole = apply_overrides(get_preset("tiny"), ["train.lr=1", "train.steps=5"])
    assert type(whole.train.lr) is float and type(whole.train.steps) is int
    with pytest.raises(ValueError, match="width belongs to torus"):
        apply_overrides(get_preset("tiny"), ["kg.width=8"])
    assert (run.train.lr, run.kg.seed, run.model.act_fn) == (0.01, 3, "relu")
    with pytest.raises(ValueError, match="has no field 'lrate'"):
        apply_overrides(get_preset("tiny"), ["train.lrate=1"])
    with pytest.raises(ValueError, match="PART.FIELD=VALUE"):
        apply_overrides(get_preset("tiny"), ["lr=1"])


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    from kgshatter.training import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(get_preset("tiny"), out, progress=False)
    return out


def test_edit_a_fact_and_a_sampled_sequence(tiny_run_dir, tmp_path, capsys):
    from kgshatter.editing import Edit

    out = tmp_path / "e"
    args = ["edit", str(tiny_run_dir), "--method", "rome", "--fact", "e003 I_C1"]
    args += ["--target", "e007", "--out", str(out), "--quiet", "--max-queries", "32"]
    args += ["--set", "n_samples=1000"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "rome single: efficacy 100.0%" in printed and "compositional" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "single" and metrics["requests"][0]["fact"] == "e03 I_C1 -> e07"
    assert metrics["summary"]["efficacy"] == 1.0
    assert Edit.load(out / "edit_000").method == "rome"
    assert any((tiny_run_dir / "cache").iterdir())  # statistics cached for the next edit
    seq = ["edit", str(tiny_run_dir), "--method", "alphaedit", "--sample", "counterfactual"]
    seq += ["--distance", "3", "--n", "2", "--protocol", "sequential", "--quiet"]
    seq += ["--max-queries", "32", "--set", "n_samples=1000"]
    assert main(seq) == 0
    folder = tiny_run_dir / "edits" / "alphaedit-d3-n2-seed0-sequential"
    records = json.loads((folder / "metrics.json").read_text())["records"]
    assert [r["protocol"] for r in records] == ["sequential"] * 2
    assert "earlier edits still holding" in capsys.readouterr().out


def test_edit_bad_input_exits_2_before_loading(tiny_run_dir, capsys):
    base = ["edit", str(tiny_run_dir), "--quiet"]
    cases = [
        (["--method", "rom", "--fact", "e003 I_C1", "--target", "e007"], "unknown editing method"),
        (["--method", "rome", "--fact", "e003 I_C1"], "--fact needs --target"),
        (["--method", "rome"], "either --fact"),
        (["--method", "rome", "--fact", "e003 X_C1", "--target", "e1"], "unknown relation"),
        (["--method", "rome", "--fact", "e003 I_C1", "--target", "e099"], "entity"),
        (
            ["--method", "rome", "--set", "layer=9", "--fact", "e003 I_C1", "--target", "e007"],
            "model has layers 0..1",
        ),  # fmt: skip
        (
            ["--method", "rome", "--set", "lyer=0", "--fact", "e003 I_C1", "--target", "e007"],
            "unknown ROMEConfig fields",
        ),  # fmt: skip
        (["--method", "memit", "--sample", "counterfactual", "--distance", "9"], "distance"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err


def test_phase_messages_threads_and_interrupts(tmp_path, capsys, monkeypatch):
    """Phases are announced at the default level; --threads 0 is one line; Ctrl-C (or SIGTERM)
    says how to resume instead of printing a traceback."""
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--out", str(out), "--quiet", "--set", "train.steps=20",
            "--set", "train.eval_every=20"]  # fmt: skip
    assert main(args) == 0
    assert f"training tiny for 20 steps into {out}" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "holds the finished run (step 20); reusing it" in capsys.readouterr().err
    assert main([*args[:-4], "--threads", "0", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "--threads: expected a whole number >= 1, got 0" in err and "Traceback" not in err
    assert main([*args[:-4], "--checkpoint-minutes", "-1", "--out", str(tmp_path / "t")]) == 2
    assert "--checkpoint-minutes must be >= 0" in capsys.readouterr().err

    import kgshatter.training as train_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main([*args, "--out", str(tmp_path / "k")]) == 130
    assert "interrupted; what was finished is saved" in capsys.readouterr().err


def test_default_threads_leave_room_for_another_process():
    from kgshatter.cli import default_threads

    assert 1 <= default_threads() <= max(1, (__import__("os").cpu_count() or 1) // 2)


@pytest.mark.parametrize("device", ["nosuch", "cuda:7"])
def test_bad_devices_exit_2_before_any_work(tmp_path, capsys, device):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    for cmd in (["train", "--preset", "tiny", "--out", str(tmp_path / "r")],
                ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "p")],
                ["months", "--model", "tiny:gpt2", "--out", str(tmp_path / "m")]):  # fmt: skip
        assert main([*cmd, "--device", device]) == 2
        err = capsys.readouterr().err
        assert "device" in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # nothing was written
