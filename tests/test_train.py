"""train.py end to end on the real tiny stories260K model: outputs, adapter, loss, resume, flags.

The runs use a 16-example slice, 2 epochs and a handful of test examples, so each takes seconds.
The multi-process comparison (torchrun with gloo) is in test_train_distributed.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from adapter import load_adapter
from conftest import ROOT, STORIES260K, data_dir_args
from data import collate, load_examples, tokenize_ce
from eval import evaluate
from machinery.heads_file import plot_heads
from model import Llama
from tokenizer import load_tokenizer

TINY = ["--epochs", "2", "--train-size", "16", "--batch-size", "5", "--micro-batch-size", "2",
        "--limit-eval", "4", "--k", "6", "--lr-a", "0.05", "--lr-v", "0.05", "--l1", "1e-3"]


def tiny_args(task, out, *extra):
    return ["--task", task, "--model", str(STORIES260K), *data_dir_args(task), "--out", str(out), *TINY, *extra]


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def mquake_run(tmp_path_factory):
    """One uninterrupted run (both stages + eval) of the CE task MQuAKE; shared by several tests."""
    out = tmp_path_factory.mktemp("mquake_full")
    started = time.time()
    assert train.main(tiny_args("mquake", out)) == 0
    return out, time.time() - started


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def outcome(out) -> dict:
    """metrics.json without what differs between equal runs: wall times and whether the base scores were cached."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("seconds")
    metrics["base"] = metrics.get("base", {}).get("summary")
    return metrics


def adapter_tensors(out):
    return load_file(str(out / "adapter.safetensors"))


def assert_same_adapter(a, b, atol=0.0):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=atol, msg=name)


def training_ce(model, tokenizer, examples) -> float:
    """Mean answer-token cross-entropy over `examples`, computed from full logits (independent of lofit.py)."""
    batch = collate([tokenize_ce(tokenizer, ex.prompt, ex.answer) for ex in examples], tokenizer.pad_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
    targets = batch["input_ids"][:, 1:]  # token t is predicted at t - 1
    mask = batch["loss_mask"][:, 1:]
    return F.cross_entropy(logits[:, :-1][mask], targets[mask]).item()


# ---------------------------------------------------------------------------------------------
# A full run


def test_full_run_writes_every_output(mquake_run):
    out, seconds = mquake_run
    assert seconds < 60, f"a tiny full run took {seconds:.0f} s"
    for name in ("config.json", "heads.json", "adapter.safetensors", "metrics.json", "eval_details.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()  # a finished run keeps no checkpoint
    assert (out / "heads.png").is_file() == has_matplotlib()
    assert not list(out.glob("*.tmp"))
    config = json.loads((out / "config.json").read_text())
    assert config["flags"]["task"] == "mquake" and config["resolved"]["k"] == 6
    assert config["resolved"]["lr_a"] == 0.05 and config["world_size"] == 1
    heads = json.loads((out / "heads.json").read_text())
    scores = [r["score"] for r in heads["ranking"]]
    assert len(scores) == 5 * 8 and scores == sorted(scores, reverse=True)
    assert heads["selected"] == [[r["layer"], r["head"]] for r in heads["ranking"][:6]]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 4 and 0 <= metrics["test"]["accuracy"] <= 1
    assert len(metrics["train_loss"]["stage1"]) == 2 and len(metrics["train_loss"]["stage2"]) == 2
    assert len(json.loads((out / "eval_details.json").read_text())) == 4


def test_adapter_loads_back_lowers_the_loss_and_reproduces_the_metrics(mquake_run):
    out, _ = mquake_run
    weights = STORIES260K
    model, tokenizer = Llama.from_pretrained(str(weights)), load_tokenizer(str(weights))
    examples = load_examples("mquake", "train", train_size=16, seed=42)
    base_loss = training_ce(model, tokenizer, examples)
    load_adapter(out / "adapter.safetensors", model)
    selected = {tuple(h) for h in json.loads((out / "heads.json").read_text())["selected"]}
    for layer, block in enumerate(model.layers):
        assert not block.self_attn.lofit_A.any()  # stage 2 keeps no scale
        for head in range(8):
            assert bool(block.self_attn.lofit_v[head].any()) == ((layer, head) in selected)
    tuned_loss = training_ce(model, tokenizer, examples)
    assert tuned_loss < base_loss - 0.05, (base_loss, tuned_loss)
    test = load_examples("mquake", "test")[:4]
    again = evaluate(model, tokenizer, "mquake", test, progress=False)
    assert again["summary"] == json.loads((out / "metrics.json").read_text())["test"]


def test_stage_one_only_then_stage_two_from_its_heads(tmp_path, mquake_run):
    """--stage 1 gives the same ranking as a full run; --stage 2 --heads then gives the same adapter."""
    full, _ = mquake_run
    assert train.main(tiny_args("mquake", tmp_path / "s1", "--stage", "1")) == 0
    assert json.loads((tmp_path / "s1" / "heads.json").read_text())["ranking"] == \
        json.loads((full / "heads.json").read_text())["ranking"]
    assert "test" not in json.loads((tmp_path / "s1" / "metrics.json").read_text())  # stage 1 alone: no eval
    assert train.main(tiny_args("mquake", tmp_path / "s2", "--heads", str(tmp_path / "s1" / "heads.json"))) == 0
    assert_same_adapter(tmp_path / "s2", full)


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("stop_after", [1, 3])  # inside stage 1; inside stage 2
def test_resume_gives_the_uninterrupted_adapter(tmp_path, mquake_run, stop_after, capsys):
    full, _ = mquake_run
    assert train.main(tiny_args("mquake", tmp_path, "--stop-after", str(stop_after))) == 0
    assert "continue with the same flags and --resume" in capsys.readouterr().out
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "adapter.safetensors").exists()
    assert train.main(tiny_args("mquake", tmp_path, "--resume")) == 0
    assert_same_adapter(tmp_path, full)
    assert outcome(tmp_path) == outcome(full)


def test_killed_run_resumes_to_the_uninterrupted_adapter(tmp_path, mquake_run):
    """SIGKILL right after the first checkpoint lands, mid-run, then --resume."""
    full, _ = mquake_run
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_args("mquake", tmp_path)], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "adapter.safetensors").exists()
    assert train.main(tiny_args("mquake", tmp_path, "--resume")) == 0
    assert_same_adapter(tmp_path, full)


# ---------------------------------------------------------------------------------------------
# Bad flags and inputs


@pytest.mark.parametrize("extra, message", [
    (["--k", "41"], "K = 41 is more than the model's 40 heads"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--k-percent", "150"], "--k-percent must be in (0, 100]"),
    (["--stage", "2"], "--stage 2 needs --heads FILE"),
    (["--stage", "1", "--heads", "x.json"], "--heads replaces stage 1"),
    (["--resume"], "has no checkpoint.pt to continue from"),
    (["--fold", "1"], "mquake has no fold 1"),
    (["--dtype", "float16"], "--dtype float16 would train without loss scaling"),
    (["--gpus", "8"], "--gpus N plans for hardware this job does not have: it goes with --plan"),
    (["--compile", "--sharding", "shard"], "with --sharding shard, leave --compile out"),
])
def test_bad_flags_exit_2_with_a_message(tmp_path, capsys, extra, message):
    argv = tiny_args("mquake", tmp_path / "out")
    if "--k-percent" in extra or "--k" in extra:  # replace TINY's --k
        i = argv.index("--k")
        del argv[i:i + 2]
    argv += extra
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_argparse_rejects_unknown_task_and_both_k_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--task", "squad"])
    assert exc.value.code == 2 and "invalid choice: 'squad'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--task", "mquake", "--k", "3", "--k-percent", "5"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_out_dir_with_another_runs_outputs_needs_overwrite(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert train.main(tiny_args("mquake", tmp_path, "--stop-after", "1")) == 2
    assert "already holds another run's outputs (metrics.json)" in capsys.readouterr().err
    assert train.main(tiny_args("mquake", tmp_path, "--stop-after", "1", "--overwrite")) == 0
    assert not (tmp_path / "metrics.json").exists()  # the old run's file is gone...
    assert (tmp_path / "notes.txt").read_text() == "mine"  # ...and nothing else was touched
    assert train.main(tiny_args("mquake", tmp_path, "--resume", "--seed", "1")) == 2
    assert "used other settings (seed=42)" in capsys.readouterr().err


def test_heads_file_for_another_model_is_rejected(tmp_path, capsys):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps([[0, 1], [31, 7]]))  # layer 31 exists in Llama-2-7B, not in stories260K
    assert train.main(tiny_args("mquake", tmp_path / "out", "--heads", str(heads), "--k", "2")) == 2
    assert "names heads [(31, 7)]" in capsys.readouterr().err
    heads.write_text(json.dumps([[0, 1], [0, 1], [2, 3]]))
    assert train.main(tiny_args("mquake", tmp_path / "out", "--heads", str(heads), "--k", "2")) == 2
    assert "lists heads [(0, 1)] more than once" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert train.main(tiny_args("mquake", tmp_path / "out", "--heads", str(tmp_path / "nope.json"))) == 2
    assert "--heads " + str(tmp_path / "nope.json") + ": no such file" in capsys.readouterr().err
    heads.write_text("not json")
    assert train.main(tiny_args("mquake", tmp_path / "out", "--heads", str(heads))) == 2
    assert "not a heads.json from train.py" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Defaults, batching and the gradient (no training run)


class Shape:
    def __init__(self, model_type, n_layers, n_heads, hidden_size, n_kv_heads=None):
        self.model_type, self.n_layers, self.n_heads, self.hidden_size = model_type, n_layers, n_heads, hidden_size
        self.n_kv_heads = n_kv_heads or n_heads


@pytest.mark.parametrize("task, shape, expected", [
    ("truthfulqa", Shape("llama", 32, 32, 4096), (5e-3, 5e-4, 1e-2, 32)),  # method.md's table
    ("truthfulqa", Shape("llama", 40, 40, 5120), (1e-3, 1e-3, 2e-2, 48)),
    ("mquake", Shape("gemma", 28, 16, 3072), (5e-3, 5e-4, 8e-3, 16)),
    ("clutrr", Shape("llama", 32, 32, 4096), (5e-4, 5e-3, 1e-2, 32)),
    ("clutrr", Shape("llama", 22, 32, 2048), (5e-4, 5e-3, 1e-2, 21)),  # not in the table: 7B row, 3% of 704
    ("mquake", Shape("llama", 32, 32, 4096, n_kv_heads=8), (5e-3, 1e-3, 1e-2, 30)),  # Mistral-7B: 3% of 1024
    ("boolq", Shape("llama", 32, 32, 4096), (5e-3, 1e-3, 1e-2, 96)),  # Table 3 tasks: the paper's 96 heads
    ("arc_challenge", Shape("llama", 40, 40, 5120), (1e-3, 1e-3, 8e-3, 160)),  # 13B: 10% of 1,600
])
def test_paper_defaults(task, shape, expected):
    hp = defaults(task, shape)
    assert (hp.lr_a, hp.l1, hp.lr_v, hp.k) == expected and hp.dtype == "float32"


def defaults(task, shape, *flags):
    return train.resolve_hparams(train.parse_args(["--task", task, *flags]), shape, device_type="cpu")


def test_flags_override_defaults_and_k_percent_rounds():
    hp = defaults("mquake", Shape("llama", 32, 32, 4096), "--lr-v", "0.1", "--l1", "0", "--k-percent", "5")
    assert (hp.lr_a, hp.l1, hp.lr_v, hp.k) == (5e-3, 0.0, 0.1, 51)  # 5% of 1024 = 51.2, rounded down


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_batches_cover_each_example_once_whatever_the_world_size(world):
    batches = train.epoch_batches(16, 5, seed=42, epoch=1)
    assert batches == train.epoch_batches(16, 5, seed=42, epoch=1)  # same order on every rank
    assert batches != train.epoch_batches(16, 5, seed=42, epoch=0)  # reshuffled every epoch
    assert sorted(i for b in batches for i in b) == list(range(16)) and [len(b) for b in batches] == [5, 5, 5, 1]
    for batch in batches:
        shares = [train.rank_share(batch, train.Dist(rank, world), micro=2) for rank in range(world)]
        assert len({len(s) for s in shares}) == 1  # every rank makes the same number of forward passes
        real = [i for s in shares for chunk, w in s if w == 1.0 for i in chunk]
        assert real == batch and all(len(chunk) <= 2 for s in shares for chunk, _ in s)


@pytest.mark.parametrize("task", ["mquake", "truthfulqa"])
def test_summed_micro_batch_gradients_equal_the_full_batch_gradient(task):
    """Any split into ranks and micro-batches sums to the gradient of the global batch's mean loss."""
    import lofit
    weights = STORIES260K
    model, tokenizer = Llama.from_pretrained(str(weights)), load_tokenizer(str(weights))
    examples = load_examples(task, "train", train_size=6, seed=1)
    data = train.tokenize_training_set(task, examples, tokenizer)
    if data.loss == "dpo":
        data.reference = train.reference_logprobs(model, data, 4, train.Dist())
    params = lofit.setup_stage1(model, init_std=0.1, generator=torch.Generator().manual_seed(0))
    batch = [4, 0, 5, 2, 1]

    def gradient(world, micro):
        for p in params:
            p.grad = None
        for rank in range(world):
            for chunk, weight in train.rank_share(batch, train.Dist(rank, world), micro):
                (train.micro_batch_loss(model, data, chunk, data.normaliser(batch), 0.5, "cpu") * weight).backward()
        return torch.cat([p.grad.flatten() for p in params])

    # The reference: the plain mean loss of the whole batch in one forward pass.
    for p in params:
        p.grad = None
    if data.loss == "ce":
        full = collate([data.items[i] for i in batch], data.pad_id)
        lofit.ce_loss(model, full).backward()
    else:
        rows = [(data.items[i][f"{s}_input_ids"], data.items[i][f"{s}_loss_mask"])
                for s in ("chosen", "rejected") for i in batch]
        full = collate(rows, data.pad_id)
        logp = lofit.answer_logprobs(model, full["input_ids"], full["attention_mask"], full["loss_mask"])
        ref = data.reference[batch]
        lofit.dpo_loss(logp[:5], logp[5:], ref[:, 0], ref[:, 1], beta=0.5).backward()
    expected = torch.cat([p.grad.flatten() for p in params])
    assert expected.abs().max() > 0
    for world, micro in [(1, 5), (1, 2), (2, 1), (3, 2), (8, 1)]:
        error = (gradient(world, micro) - expected).norm() / expected.norm()
        assert error < 1e-5, (world, micro, error)  # float summation order only; a wrong scale is >= 0.2


def test_heads_picture_is_drawn_or_skipped_with_a_note(mquake_run, tmp_path, capsys):
    full, _ = mquake_run
    heads = json.loads((full / "heads.json").read_text())
    ranking = [(r["layer"], r["head"], r["score"]) for r in heads["ranking"]]
    config = Shape("llama", 5, 8, 64)
    plot_heads(tmp_path / "heads.png", ranking, [tuple(h) for h in heads["selected"]], config)
    if has_matplotlib():
        assert (tmp_path / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in capsys.readouterr().out
        assert not (tmp_path / "heads.png").exists()


def test_truthfulqa_adapter_records_its_fold_and_eval_refuses_the_leaking_fold(tmp_path):
    """Fold 1's test questions are fold 0's training questions: eval.py must refuse that pairing."""
    import eval as evaluation
    out = tmp_path / "tqa1"
    assert train.main(tiny_args("truthfulqa", out, "--fold", "1", "--epochs", "1", "--train-size", "4",
                                "--limit-eval", "2")) == 0
    common = ["--task", "truthfulqa", "--model", str(STORIES260K), "--adapter", str(out / "adapter.safetensors"),
              "--limit", "2", "--quiet"]
    assert evaluation.main(common + ["--fold", "0", "--out", str(tmp_path / "leak.json")]) == 2
    assert not (tmp_path / "leak.json").exists()
    assert evaluation.main(common + ["--fold", "1", "--out", str(tmp_path / "ok.json")]) == 0


def test_no_eval_writes_the_adapter_without_test_metrics(tmp_path):
    out = tmp_path / "run"
    assert train.main(tiny_args("mquake", out, "--no-eval")) == 0
    assert (out / "adapter.safetensors").is_file() and not (out / "eval_details.json").exists()
    assert "test" not in json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------
# The run log: metrics.jsonl, and wandb when asked


def read_log(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_every_optimiser_step(mquake_run):
    out, _ = mquake_run
    rows = read_log(out)
    assert [(r["stage"], r["step"]) for r in rows] == [(s, i) for s in (1, 2) for i in range(1, 9)]  # 2 x 4 batches
    metrics = json.loads((out / "metrics.json").read_text())
    for stage in (1, 2):
        mine = [r for r in rows if r["stage"] == stage]
        assert mine[0]["lr"] == 0.05 and mine[1]["lr"] == pytest.approx(0.05 * 7 / 8)  # linear decay, no warmup
        for epoch in (1, 2):
            losses = [r["loss"] for r in mine if r["epoch"] == epoch]
            assert sum(losses) / len(losses) == pytest.approx(metrics["train_loss"][f"stage{stage}"][epoch - 1])
        assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in mine)


def test_resumed_run_logs_the_same_steps(tmp_path, mquake_run):
    full, _ = mquake_run
    assert train.main(tiny_args("mquake", tmp_path, "--stop-after", "3")) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint, then killed
        f.write(json.dumps({"stage": 2, "step": 99}) + "\n")
    assert train.main(tiny_args("mquake", tmp_path, "--resume")) == 0
    timing = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_log(tmp_path)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in read_log(full)]


def test_wandb_is_imported_only_when_asked(tmp_path, monkeypatch, capsys):
    import types
    logged, seen = [], {}

    class FakeRun:
        def log(self, row):
            logged.append(row)

        def finish(self):
            seen["finished"] = True

    def init(project, config):
        seen.update(project=project, config=config)
        return FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    assert train.main(tiny_args("mquake", tmp_path / "a", "--stop-after", "1", "--wandb", "lofit-test")) == 0
    assert seen["project"] == "lofit-test" and seen["config"]["flags"]["task"] == "mquake" and seen["finished"]
    assert [r["stage1/step"] for r in logged] == [1, 2, 3, 4] and all("stage1/loss" in r for r in logged)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert train.main(tiny_args("mquake", tmp_path / "b", "--wandb", "lofit-test")) == 2
    assert "pip install wandb" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The memory plan: --plan, and the check before loading


LLAMA_2_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
               "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
               "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def config_only(directory, tokenizer: bool):
    """A checkpoint directory holding Llama-2-70B's config.json (no weights), and stories260K's tokenizer."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA_2_70B))
    if tokenizer:
        (directory / "tokenizer.model").write_bytes((STORIES260K / "tokenizer.model").read_bytes())
    return directory


def plan_of(capsys, *argv) -> tuple[str, dict]:
    assert train.main(["--task", "truthfulqa", "--plan", *argv]) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_plan_70b_shards_on_8_gpus_and_names_the_fix_on_one(tmp_path, capsys):
    model = config_only(tmp_path / "llama-2-70b", tokenizer=True)
    out_dir = tmp_path / "out"
    text, plan = plan_of(capsys, "--model", str(model), "--gpus", "8", "--gpu-memory", "80", "--out", str(out_dir))
    assert "rows: the 326 training examples" in text and "sharding: shard (auto: replicated" in text
    assert plan["sharding"] == "shard" and plan["world"] == 8 and plan["fits"] and plan["fix"] is None
    assert plan["dtype"] == "float32" and plan["micro_batch"] == 1 and "\nfits\n" in text
    text, plan = plan_of(capsys, "--model", str(model), "--gpus", "1", "--gpu-memory", "80", "--out", str(out_dir))
    assert not plan["fits"] and plan["sharding"] == "replicate" and plan["per_gpu_gib"] > 80
    assert f"does not fit; cheapest fix: {plan['fix']}" in text and "--sharding shard" in plan["fix"]
    assert not out_dir.exists() and sorted(p.name for p in model.iterdir()) == ["config.json", "tokenizer.model"]


def test_plan_without_a_tokenizer_uses_the_task_limits(tmp_path, capsys):
    model = config_only(tmp_path / "llama-2-70b", tokenizer=False)
    text, plan = plan_of(capsys, "--model", str(model), "--gpus", "8", "--gpu-memory", "80", "--dtype", "bfloat16",
                         "--out", str(tmp_path / "out"))
    assert "rows: the task's length limits" in text and plan["lengths"] == {"prompt": 128, "answer": 384}
    assert plan["sharding"] == "shard" and plan["fits"] and plan["dtype"] == "bfloat16"
    assert not (tmp_path / "out").exists()


def test_a_run_that_cannot_fit_its_gpu_is_refused_before_loading(tmp_path, monkeypatch):
    """One process on a GPU (no torchrun, so auto replicates): the plan is checked all the same."""
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded a model that cannot fit"))
    cfg = train.parse_args(tiny_args("mquake", tmp_path / "out", "--gpu-memory", "1"))  # 1 GiB < the 3 GiB overhead
    with pytest.raises(train.UsageError, match=r"the memory plan needs 3\.0 GiB per GPU, more than 1\.0 GiB; "
                                               r"no single change tried fits \(see it with --plan\)"):
        train.run(cfg, train.Dist(device=torch.device("cuda")))  # refused before anything touches the device
    assert not (tmp_path / "out" / "config.json").exists()


def test_on_a_cpu_the_plan_refuses_nothing_and_prints_nothing(tmp_path, capsys):
    assert train.main(tiny_args("mquake", tmp_path, "--gpu-memory", "1", "--stop-after", "1")) == 0
    assert "memory plan" not in capsys.readouterr().out
    assert "memory_plan" not in json.loads((tmp_path / "config.json").read_text())


def test_tf32_precision_flag_gives_the_same_adapter_on_a_cpu_and_is_restored(tmp_path, mquake_run):
    """--matmul-precision high: TF32 exists on GPUs only, so on a CPU the run is the fp32 one."""
    assert train.main(tiny_args("mquake", tmp_path, "--matmul-precision", "high")) == 0
    assert_same_adapter(tmp_path, mquake_run[0], atol=1e-6)
    assert torch.get_float32_matmul_precision() == "highest"
    assert json.loads((tmp_path / "config.json").read_text())["flags"]["matmul_precision"] == "high"
