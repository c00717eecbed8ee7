"""machinery/flags.py: device and dtype resolution, the --out check and the error report shared by the three scripts."""
import pytest
import torch

import iti
import train
from machinery import flags as cli
from model import LlamaConfig


def test_dtype_auto_is_float32_everywhere():
    """The paper trained in fp32; bf16 changes the method (README), so it is never chosen silently."""
    assert cli.resolve_dtype("auto", "cuda") == cli.resolve_dtype("auto", "cuda:1") == "float32"
    assert cli.resolve_dtype("auto", "cpu") == "float32"
    assert train.resolve_hparams(train.parse_args(["--task", "mquake"]), LlamaConfig(), "cuda").dtype == \
        "float32"
    assert cli.resolve_dtype("float16", "cpu") == "float16" and cli.resolve_dtype("float32", "cuda") == "float32"


def test_device_auto_follows_what_pytorch_sees():
    assert cli.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cli.resolve_device("cpu") == "cpu"
    with pytest.raises(cli.UsageError, match="--device 'gpu' is not a device name"):
        cli.resolve_device("gpu")


@pytest.mark.parametrize("main, argv", [
    (train.main, ["--task", "mquake"]),
    (iti.main, ["--task", "truthfulqa"]),
])
def test_train_and_iti_refuse_cuda_where_there_is_none(tmp_path, capsys, main, argv):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(cli.UsageError, match="--device cuda:1: CUDA is not available here; use --device cpu"):
        cli.resolve_device("cuda:1")
    assert main([*argv, "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: --device cuda: CUDA is not available here; use --device cpu\n"
    assert not (tmp_path / "out").exists()


def test_existing_outputs_lists_only_the_scripts_own_files(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.existing_outputs(tmp_path, ("config.json", "metrics.json", "notes.md")) == ["metrics.json"]
    assert cli.existing_outputs(tmp_path / "not yet made", ("metrics.json",)) == []
    with pytest.raises(cli.UsageError, match="is a file; pass a directory"):
        cli.existing_outputs(tmp_path / "notes.txt", ("metrics.json",))


def test_report_error_prints_one_line_and_returns_2(capsys):
    assert cli.report_error(cli.UsageError("--k must be positive, got 0")) == 2
    assert capsys.readouterr().err == "error: --k must be positive, got 0\n"
    assert cli.report_error(ValueError("quiet rank"), print_message=False) == 2
    assert capsys.readouterr().err == ""


def test_one_vocabulary_across_the_three_scripts():
    """The shared flags parse to the same names and defaults in train.py, eval.py and iti.py."""
    import eval as evaluation
    common = ["--model", "m", "--data-dir", "d", "--tokenizer", "tokenizer.json", "--dtype", "float16",
              "--device", "cpu", "--limit", "3", "--eval-batch-size", "5"]
    parsed = [train.parse_args(["--task", "mquake", *common]), evaluation.parse_args(["--task", "mquake", *common]),
              iti.parse_args(["--task", "truthfulqa", *common])]
    for args in parsed:
        assert (args.model, args.data_dir, args.tokenizer, args.dtype, args.device, args.limit,
                args.eval_batch_size) == ("m", "d", "tokenizer.json", "float16", "cpu", 3, 5)
    old = [train.parse_args(["--task", "mquake", "--limit-eval", "4"]), iti.parse_args(["--limit-eval", "4"])]
    assert all(args.limit == 4 for args in old)  # the old spelling still works


@pytest.mark.parametrize("main, argv", [
    (train.main, ["--task", "mquake"]),
    (iti.main, ["--task", "truthfulqa"]),
    ("eval", ["--task", "mquake", "--model", "m"]),
])
def test_one_validator_says_the_same_thing_everywhere(tmp_path, capsys, main, argv):
    import eval as evaluation
    main = evaluation.main if main == "eval" else main
    for flag, value, message in [("--limit", "0", "--limit must be positive, got 0"),
                                 ("--eval-batch-size", "-1", "--eval-batch-size must be positive, got -1")]:
        assert main([*argv, flag, value, "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_every_user_error_is_a_lofit_error():
    import adapter
    import data
    import model
    import tokenizer
    from model import LofitError
    from storage import hub
    for error in (cli.UsageError, data.DataError, hub.HubError, model.CheckpointError, tokenizer.TokenizerError,
                  adapter.AdapterError):
        assert issubclass(error, LofitError)
