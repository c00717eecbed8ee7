"""Nothing lost, ever: each class of fault a hostile user can cause, emulated on the tiny stories260K.

One test (or a few) per class: --overwrite keeps the old run until the new one has finished; one run
per --out; non-finite values; eval.py --out; retrying a run that failed early; stale temporaries;
write errors; Ctrl-C; damaged inputs; misleading paths; progress messages; heads.png's title; prompts
longer than the model's context. Faults are emulated: OSError(ENOSPC / EROFS) raised by patched
functions (tests may run as root, where chmod does not stop writes), a second process holding the
lock, NaN weights in a copy of the tiny checkpoint, random bytes for a checkpoint.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import subprocess_env, tiny_args

import eval as evaluation
import train
from conftest import ROOT, SPLITS_DIR, STORIES260K
from machinery import heads_file as heads
from machinery import rundir
from storage import atomic

QUICK = ["--stage", "1", "--epochs", "2"]  # stage 1 only: a finished run in about a second


def snapshot(out):
    """Every file under `out` (hidden ones included) and its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def strict_json(path):
    """Parse as strict JSON: a bare NaN / Infinity is an error."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def model_copy(tmp_path, name="model", config=None):
    """A copy of stories260K that a test may damage: its own config.json, the weights copied."""
    src = STORIES260K
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return dst


def args_with_model(model, out, *extra):
    argv = tiny_args("mquake", out, *extra)
    argv[argv.index("--model") + 1] = str(model)
    return argv


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


# ---------------------------------------------------------------------------------------------
# 1. --overwrite keeps the old outputs until the new run has finished


def test_overwrite_whose_new_run_fails_leaves_the_old_outputs_byte_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, *QUICK)) == 0
    before = snapshot(out)
    assert {"adapter.safetensors", "metrics.json", "heads.json", "config.json"} <= set(before)
    broken = model_copy(tmp_path, "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated weights: the new run fails while loading
    assert train.main(args_with_model(broken, out, *QUICK, "--overwrite")) == 2
    one_line_error(capsys)
    assert snapshot(out) == before  # byte-identical, and no marker, lock or .previous-run left


def test_overwrite_killed_before_its_first_checkpoint_is_undone_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, *QUICK)) == 0
    before = snapshot(out)
    killed = textwrap.dedent(f"""
        import os, train
        from machinery import rundir
        with rundir.claim({str(out)!r}, train.OUTPUT_FILES, overwrite=True, checkpoint="checkpoint.pt"):
            open({str(out / "config.json")!r}, "w").write("the new run's config")
            os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", killed], cwd=ROOT, env=subprocess_env())
    assert proc.returncode == -9
    assert (out / rundir.PREVIOUS).is_dir() and (out / "config.json").read_text() == "the new run's config"
    # The next run in the directory puts the old run back before looking at it: a finished run, so
    # without --overwrite it is refused, and nothing of it changed.
    assert train.main(tiny_args("mquake", out, *QUICK)) == 2
    assert "ended before its first checkpoint" in capsys.readouterr().out
    assert snapshot(out) == before


def test_overwrite_that_finishes_replaces_the_old_run(tmp_path):
    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, *QUICK)) == 0
    old = json.loads((out / "config.json").read_text())
    assert train.main(tiny_args("mquake", out, *QUICK, "--seed", "3", "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["flags"]["seed"] == 3 != old["flags"]["seed"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_iti_overwrite_interrupted_late_leaves_the_old_outputs_byte_identical(tmp_path, capsys, monkeypatch):
    import iti
    out = tmp_path / "iti"
    argv = ["--model", str(STORIES260K), "--data-dir", str(SPLITS_DIR),
            "--out", str(out), "--k", "3", "--train-size", "2", "--limit", "1"]
    assert iti.main([*argv, "--no-eval"]) == 0
    before = snapshot(out)

    def interrupted(*a, **k):  # after the new adapter and heads are written, during the evaluation
        assert (out / "adapter.safetensors").exists() and (out / rundir.PREVIOUS / "adapter.safetensors").exists()
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluation, "evaluate", interrupted)
    assert iti.main([*argv, "--overwrite"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("phase", ["replacing", "running", "committing"])
def test_a_kill_at_any_step_of_a_replacement_loses_nothing(tmp_path, phase):
    """The directory as kill -9 leaves it at each step of rundir's bookkeeping, then the next run."""
    from machinery.flags import UsageError
    out, outputs = tmp_path / "run", ("a.json", "b.json", "checkpoint.pt")
    (out / rundir.PREVIOUS).mkdir(parents=True)
    (out / rundir.PREVIOUS / "a.json").write_text("old a")
    if phase == "replacing":  # killed while moving the finished run aside: b.json not moved yet
        (out / "b.json").write_text("old b")
    else:  # the new run wrote its files (and, committing, finished them)
        (out / "a.json").write_text("new a")
        (out / "checkpoint.pt").write_text("new checkpoint")
    (out / rundir.MARKER).write_text(json.dumps({"phase": phase, "pid": 1, "host": "h", "started": "t"}))
    if phase == "running":  # killed mid-run with a checkpoint: resumable, the old run kept aside
        with rundir.claim(out, outputs, resume=True, checkpoint="checkpoint.pt"):
            pass
        assert (out / rundir.PREVIOUS / "a.json").read_text() == "old a"
        return
    with pytest.raises(UsageError, match="already holds another run's outputs"):
        with rundir.claim(out, outputs, checkpoint="checkpoint.pt"):
            pass
    expected = {"a.json": "old a", "b.json": "old b"} if phase == "replacing" else {"a.json": "new a"}
    assert {p.name: p.read_text() for p in out.iterdir()} == expected


# ---------------------------------------------------------------------------------------------
# 2. One run per --out


def test_a_second_run_into_a_busy_out_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    holder = textwrap.dedent(f"""
        import time, train
        from machinery import rundir
        with rundir.claim({str(out)!r}, train.OUTPUT_FILES, checkpoint="checkpoint.pt",
                          command="python train.py --the-first-run"):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert train.main(tiny_args("mquake", out, *QUICK)) == 2
        line = one_line_error(capsys, "is in use by another run", f"pid {proc.pid}", "--the-first-run")
        assert os.uname().nodename in line
        assert not (out / "config.json").exists()  # the refused run wrote nothing
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9  # kill -9: the kernel dropped the lock
    assert train.main(tiny_args("mquake", out, *QUICK)) == 0


# ---------------------------------------------------------------------------------------------
# 3. Non-finite values


def test_nan_weights_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, capsys):
    model = model_copy(tmp_path)
    out = tmp_path / "run"
    assert train.main(args_with_model(model, out, "--stop-after", "1")) == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    weights = load_file(str(model / "model.safetensors"))
    name = next(n for n in weights if "o_proj" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert train.main(args_with_model(model, out, "--resume")) == 2
    one_line_error(capsys, "not a finite number", "last good checkpoint (stage 1, after epoch 1)")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert not (out / "adapter.safetensors").exists() and not (out / "metrics.json").exists()
    for path in out.glob("*.json"):
        strict_json(path)

    results = tmp_path / "results.json"  # eval.py on the NaN model: NaN scores are written as null
    assert evaluation.main(["--task", "truthfulqa", "--model", str(model), "--data-dir", str(SPLITS_DIR),
                            "--limit", "1", "--quiet", "--out", str(results)]) == 0
    assert strict_json(results)["summary"]["mc2"] is None
    assert "are not finite numbers and are written as null" in capsys.readouterr().err


def test_non_finite_adapter_and_checkpoint_are_refused_on_load(tmp_path, capsys):
    from adapter import AdapterError, load_adapter, save_adapter
    from model import Llama
    model = Llama.from_pretrained(str(STORIES260K))
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, model, [(0, 1), (2, 3)], stage=2, task="mquake")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:  # keep the metadata, poison v
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["v"][1, 0] = float("inf")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(AdapterError, match="NaN or infinity in v"):
        load_adapter(path, model)
    with torch.no_grad():
        model.layers[0].self_attn.lofit_v[1, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN or infinity"):  # and never written in the first place
        save_adapter(tmp_path / "b.safetensors", model, [(0, 1)], stage=2, task="mquake")
    assert not (tmp_path / "b.safetensors").exists()

    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, "--stop-after", "1")) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    next(iter(state["params"].values()))[0, 0] = float("nan")
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert train.main(tiny_args("mquake", out, "--resume")) == 2
    one_line_error(capsys, "non-finite values (NaN/inf)")


@pytest.mark.parametrize("flag", ["--l1", "--lr-v", "--init-std"])
def test_non_finite_flags_are_refused(tmp_path, capsys, flag):
    assert train.main(tiny_args("mquake", tmp_path / "run", flag, "nan")) == 2
    one_line_error(capsys, f"{flag} must be")
    import iti
    assert iti.main(["--out", str(tmp_path / "iti"), "--alpha", "inf"]) == 2
    one_line_error(capsys, "--alpha must be a finite number, got inf")
    assert not list(tmp_path.iterdir())


def test_json_outputs_are_strict_and_say_how_nan_is_written(tmp_path, capsys):
    path = tmp_path / "metrics.json"
    atomic.write_json_atomically(path, {"test": {"mc2": float("nan"), "n": 3}, "loss": [1.0, float("inf")]})
    assert strict_json(path) == {"test": {"mc2": None, "n": 3}, "loss": [1.0, None]}
    err = capsys.readouterr().err
    assert "2 value(s) are not finite numbers and are written as null" in err
    assert "test.mc2 (nan)" in err and "loss[1] (inf)" in err


# ---------------------------------------------------------------------------------------------
# 4. eval.py --out


def eval_args(out, *extra):
    return ["--task", "mquake", "--model", str(STORIES260K),
            "--data-dir", str(SPLITS_DIR), "--limit", "2", "--quiet", "--out", str(out), *extra]


def test_eval_refuses_an_existing_results_file_and_keeps_results_when_the_write_fails(tmp_path, capsys,
                                                                                        monkeypatch):
    out = tmp_path / "results.json"
    out.write_text("earlier results")
    assert evaluation.main(eval_args(out)) == 2
    one_line_error(capsys, "already exists", "--overwrite")
    assert out.read_text() == "earlier results"

    real = atomic.write_text_atomically

    def full_disk(path, text):
        if str(path) == str(out):
            raise atomic.write_error(path, OSError(errno.ENOSPC, "No space left on device"))
        return real(path, text)
    monkeypatch.setattr(atomic, "write_text_atomically", full_disk)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "fallback"))
    (tmp_path / "fallback").mkdir()
    assert evaluation.main(eval_args(out, "--overwrite")) == 2
    line = one_line_error(capsys, "the disk is full", "the results were written to")
    fallback = line.split("the results were written to ")[1].split(" instead")[0]
    results = strict_json(type(out)(fallback))
    assert results["summary"]["n"] == 2 and len(results["details"]) == 2
    assert out.read_text() == "earlier results"


# ---------------------------------------------------------------------------------------------
# 5. A run that failed before its first checkpoint is retried by the same command


def test_failed_start_is_retryable_with_the_same_command_and_messages_tell_the_states_apart(tmp_path, capsys):
    model = model_copy(tmp_path)
    good = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(good[:1000])
    out = tmp_path / "run"
    argv = args_with_model(model, out, "--stop-after", "1")
    assert train.main(argv) == 2
    assert not out.exists()  # the failed first run left nothing behind
    (model / "model.safetensors").write_bytes(good)
    assert train.main(argv) == 0  # the same command, once the weights are fixed

    capsys.readouterr()
    assert train.main(args_with_model(model, out)) == 2  # started, not finished
    one_line_error(capsys, "holds an unfinished run", "--resume to continue it")
    assert train.main(args_with_model(model, out, "--resume")) == 0
    assert train.main(args_with_model(model, out, "--resume")) == 2  # finished
    one_line_error(capsys, "the run there finished")


def test_run_killed_before_its_first_checkpoint_does_not_block_the_same_command(tmp_path, capsys):
    out = tmp_path / "run"
    killed = textwrap.dedent(f"""
        import json, os, train
        from machinery import rundir
        with rundir.claim({str(out)!r}, train.OUTPUT_FILES, checkpoint="checkpoint.pt"):
            open({str(out / "config.json")!r}, "w").write("{{}}")
            os.kill(os.getpid(), 9)
    """)
    assert subprocess.run([sys.executable, "-c", killed], cwd=ROOT, env=subprocess_env()).returncode == -9
    assert (out / "config.json").exists() and (out / rundir.MARKER).exists()
    assert train.main(tiny_args("mquake", out, *QUICK)) == 0
    assert "ended before its first checkpoint; its files were removed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 6. Stale temporaries of a killed writer


def test_stale_temporaries_are_removed_by_the_next_run_and_by_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pt.k2j4_x9a.tmp", out / ".metrics.json.abcdefgh.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (out / "notes.tmp").write_text("mine")  # not a temporary of ours
    assert train.main(tiny_args("mquake", out, *QUICK)) == 0
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").read_text() == "mine"
    stale[0].write_bytes(b"half")
    assert train.main(tiny_args("mquake", out, *QUICK, "--overwrite")) == 0
    assert not stale[0].exists()


def test_eval_removes_stale_temporaries_of_its_out_file_only(tmp_path):
    out = tmp_path / "results.json"
    stale, fresh, other = (tmp_path / ".results.json.abcd1234.tmp", tmp_path / ".results.json.efgh5678.tmp",
                           tmp_path / ".other.json.abcd1234.tmp")
    for path in (stale, fresh, other):
        path.write_text("half")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    assert evaluation.main(eval_args(out)) == 0
    assert not stale.exists() and fresh.exists() and other.exists()  # a fresh one may be a running writer's


# ---------------------------------------------------------------------------------------------
# 7. Write errors: one line, exit 2


def test_full_disk_while_checkpointing_is_one_line(tmp_path, capsys, monkeypatch):
    real = torch.save

    def full(obj, f, *a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")  # what torch.save raised on a full tmpfs
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, *QUICK)) == 2
    one_line_error(capsys, f"cannot write {out / 'checkpoint.pt'}", "disk full")
    monkeypatch.setattr(torch, "save", real)
    assert not out.exists()  # nothing of the failed run is left; the same command runs again
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"),
                                         (errno.EACCES, "permission denied")])
def test_uncreatable_out_is_one_line(tmp_path, capsys, monkeypatch, code, words):
    real = os.mkdir

    def refuse(path, *a, **k):
        if "run" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "mkdir", refuse)
    assert train.main(tiny_args("mquake", tmp_path / "run", *QUICK)) == 2
    one_line_error(capsys, "cannot be created or written", words)


def test_read_only_out_for_config_json_is_one_line(tmp_path, capsys, monkeypatch):
    real = atomic.tempfile.mkstemp

    def read_only(*a, dir=None, prefix="", **k):
        if prefix == ".config.json.":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, prefix=prefix, **k)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert train.main(tiny_args("mquake", tmp_path / "run", *QUICK)) == 2
    one_line_error(capsys, "config.json", "read-only")


def test_data_dump_to_a_directory_or_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    from data.__main__ import main as dump
    common = ["--task", "clutrr", "--split", "val", "--data-dir", str(SPLITS_DIR)]
    assert dump([*common, "--dump", str(tmp_path)]) == 2
    one_line_error(capsys, "is a directory")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    assert dump([*common, "--dump", str(tmp_path / "x.jsonl")]) == 2
    one_line_error(capsys, "the disk is full")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 8. Ctrl-C


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = train.micro_batch_loss

    def interrupt_at(n):  # 16 examples, batches of 5, micro-batches of 2: 10 calls per epoch
        calls = []

        def loss(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*a, **k)
        return loss
    monkeypatch.setattr(train, "micro_batch_loss", interrupt_at(4))  # in the first epoch
    assert train.main(tiny_args("mquake", out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted before the first checkpoint" in err
    assert not out.exists()
    monkeypatch.setattr(train, "micro_batch_loss", interrupt_at(14))  # in the second epoch
    assert train.main(tiny_args("mquake", out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"the last checkpoint is {out / 'checkpoint.pt'} (stage 1, after epoch 1)" in err
    command = err.strip().splitlines()[-1].split()
    assert command[:2] == ["python", "train.py"] and command[-1] == "--resume"
    monkeypatch.setattr(train, "micro_batch_loss", real)
    assert train.main(command[2:]) == 0
    assert "resuming from stage 1 epoch 2/2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 9. Damaged inputs: config.json with wrong types, a damaged or incomplete checkpoint.pt


@pytest.mark.parametrize("change, words", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ({"num_attention_heads": "8"}, "num_attention_heads must be a positive whole number, not '8'"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive whole number, not 0"),
    ({"num_key_value_heads": 3}, "is not a multiple of num_key_value_heads"),
])
def test_model_config_with_wrong_types_is_one_line(tmp_path, capsys, change, words):
    config = json.loads((STORIES260K / "config.json").read_text())
    model = model_copy(tmp_path, config=change if isinstance(change, str) else {**config, **change})
    assert train.main(args_with_model(model, tmp_path / "run", *QUICK)) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, words", [
    (b"\x80\x02random bytes that are not a checkpoint" * 10, "is damaged or incomplete"),
    ("truncated", "is damaged or incomplete"),
    ("incomplete", "missing or malformed: stage, epoch"),
])
def test_damaged_checkpoint_is_one_line_without_unsafe_advice(tmp_path, capsys, content, words):
    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, "--stop-after", "1")) == 0
    path = out / "checkpoint.pt"
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "incomplete":
        torch.save({"key": {}, "params": {}}, path)
    else:
        path.write_bytes(content)
    capsys.readouterr()
    assert train.main(tiny_args("mquake", out, "--resume")) == 2
    line = one_line_error(capsys, words, "--overwrite")
    assert "weights_only" not in line and "will likely succeed" not in line
    assert path.exists()  # refused, not deleted


# ---------------------------------------------------------------------------------------------
# 10. Misleading paths


def test_eval_explains_a_run_directory_an_adapter_directory_and_an_empty_out(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(tiny_args("mquake", run, *QUICK)) == 0
    common = ["--task", "mquake", "--data-dir", str(SPLITS_DIR), "--quiet"]
    assert evaluation.main([*common, "--model", str(run)]) == 2
    one_line_error(capsys, "is a train.py/iti.py output directory", f"--adapter {run / 'adapter.safetensors'}")
    model = str(STORIES260K)
    assert evaluation.main([*common, "--model", model, "--adapter", str(run)]) == 2
    one_line_error(capsys, "is a directory (it holds adapter.safetensors)", str(run / "adapter.safetensors"))
    assert evaluation.main([*common, "--model", model, "--out", ""]) == 2
    one_line_error(capsys, "--out is empty")
    assert train.main(tiny_args("mquake", "")) == 2
    one_line_error(capsys, "--out is empty")


# ---------------------------------------------------------------------------------------------
# 11. What a person sees: loading, the DPO reference pass, resuming


def test_progress_while_loading_and_in_the_dpo_reference_pass(tmp_path, capsys):
    argv = tiny_args("truthfulqa", tmp_path / "tqa", "--epochs", "1", "--train-size", "4", "--no-eval",
                     "--stop-after", "1")
    assert train.main(argv) == 0
    captured = capsys.readouterr()
    assert "loading " in captured.out and "model loaded in" in captured.out
    assert "DPO reference pass: the base model's log-probs of 4 answer pairs" in captured.out
    assert "DPO reference log-probs" in captured.err and "loading weights" in captured.err  # the bars


# ---------------------------------------------------------------------------------------------
# 12. heads.png's title says what the scores are and where the ranking came from


@pytest.mark.parametrize("source, meaning", [
    ("stage 1 of this run", "stage-1 ||A||_2"),
    ("ITI probe accuracy on the validation questions", "ITI probe accuracy"),
    ("--heads runs/tqa/heads.json (stage 1 of this run)", "stage-1 ||A||_2"),
    ("--heads runs/iti/heads.json (ITI probe accuracy on the validation questions)", "ITI probe accuracy"),
])
def test_heads_picture_title_follows_the_ranking_source(tmp_path, monkeypatch, source, meaning):
    plt = pytest.importorskip("matplotlib.pyplot")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    ranking = [(layer, head, float(layer + head)) for layer in range(2) for head in range(3)]
    heads.plot_heads(tmp_path / "heads.png", ranking, [(1, 2)], type("C", (), {"n_layers": 2, "n_heads": 3}),
                     source)
    title = figures[0].axes[0].get_title()
    assert title.startswith(f"{meaning} per head\n") and "K = 1 selected" in title
    assert source[-40:] in title


# ---------------------------------------------------------------------------------------------
# 13. Prompts longer than the model's context


def test_prompts_beyond_max_position_embeddings_warn_once_with_the_count(capsys):
    from data import load_examples
    from model import Llama
    from tokenizer import load_tokenizer
    weights = str(STORIES260K)
    model, tokenizer = Llama.from_pretrained(weights), load_tokenizer(weights)
    assert model.config.max_position_embeddings == 512
    test = load_examples("truthfulqa", "test", data_dir=SPLITS_DIR)[:2]  # prompts of ~620 tokens
    evaluation.evaluate(model, tokenizer, "truthfulqa", test, progress=True)
    err = capsys.readouterr().err
    assert err.count("max_position_embeddings") == 1
    assert "2 of 2 test questions (prompt + longest answer) are longer than the model's " \
           "max_position_embeddings (512 tokens" in err
