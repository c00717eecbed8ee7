"""A form of intervention is checked before any work, and its failures are one line.

Import errors and SystemExit of a form file, built-in names, settings type-checked from the
dataclass field types, the edit's shape and exactness at zero (install), exceptions in setup and
edit (one FormError line; LOFIT_DEBUG=1 lets the traceback through), trained rows outside the
saved heads, and the adapter recording every form other than exactly LoFiT.
"""
import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from test_train import tiny_args

import adapter
import lofit
import train
from hf_reference import make_checkpoint
from machinery.flags import UsageError, resolve_intervention
from model import Llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama2")  # 2 layers x 4 heads, head_dim 16
    return path


def form_file(tmp_path, body: str, name: str = "form.py"):
    path = tmp_path / name
    path.write_text("from dataclasses import dataclass\nimport torch\nimport lofit\n" + body)
    return str(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err  # besides progress bars
    lines = [line for line in err.splitlines() if line.startswith("error: ") or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Files and names


def test_import_errors_and_system_exit_are_one_line(tmp_path, capsys):
    for body, expected in [("import no_such_module_anywhere\n", "ModuleNotFoundError"),
                           ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
                           ("raise SystemExit('bye')\n", "SystemExit: bye")]:
        path = form_file(tmp_path, body)
        assert train.main(tiny_args("mquake", tmp_path / "out", "--intervention", path)) == 2
        assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_file_cannot_take_a_built_in_or_registered_name(tmp_path):
    body = "@lofit.register\n@dataclass\nclass Mine(lofit.LoFiT):\n    name = 'lofit'\n"
    with pytest.raises(UsageError, match="'lofit' is a built-in form"):
        resolve_intervention(form_file(tmp_path, body, "builtin.py"))
    assert lofit.INTERVENTIONS["lofit"] is lofit.LoFiT
    lofit.register(Settings)
    body = ("@lofit.register\n@dataclass\nclass Again(lofit.LoFiT):\n    name = 'test_settings'\n")
    with pytest.raises(UsageError, match="test_settings, a name already taken"):
        resolve_intervention(form_file(tmp_path, body, "again.py"))
    assert lofit.INTERVENTIONS["test_settings"] is Settings


def test_register_refuses_forms_it_could_not_run_or_save():
    @dataclass
    class NoName(lofit.LoFiT):
        pass

    @dataclass
    class NoSetup(lofit.Intervention):
        name = "test_no_setup"

    @dataclass
    class ListSetting(lofit.LoFiT):
        sizes: list = None
        name = "test_list"
    with pytest.raises(TypeError, match="needs its own `name`"):
        lofit.register(NoName)
    with pytest.raises(TypeError, match="needs a setup"):
        lofit.register(NoSetup)
    with pytest.raises(TypeError, match="setting sizes has type list"):
        lofit.register(ListSetting)
    assert not {"test_no_setup", "test_list"} & set(lofit.INTERVENTIONS)


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings(lofit.LoFiT):
    rank: int = 2
    scale: float = 1.0
    tied: bool = False
    label: str = "x"
    name = "test_settings"


@pytest.mark.parametrize("item, message", [
    ("rank=abc", "rank must be a whole number (int), not 'abc'"),
    ("rank=null", "rank must be a whole number (int), not None"),
    ("rank=[1,2]", r"rank must be a whole number \(int\), not \[1, 2\]"),
    ("rank=2.5", "rank must be a whole number (int), not 2.5"),
    ("rank=true", "rank must be a whole number (int), not True"),
    ("scale=fast", "scale must be a number (float), not 'fast'"),
    ("scale=NaN", "scale must be a number (float), not nan"),
    ("tied=1", "tied must be true or false (bool), not 1"),
    ("size=3", "has no setting 'size'"),
])
def test_settings_are_type_checked_from_the_fields(item, message):
    lofit.register(Settings)
    escaped = message if "[" in message else message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(UsageError, match=escaped):
        resolve_intervention("test_settings", [item])


def test_good_settings_take_their_field_types():
    lofit.register(Settings)
    form = resolve_intervention("test_settings", ["rank=3", "scale=2", "tied=true", "label=3"])
    assert (form.rank, form.scale, form.tied, form.label) == (3, 2.0, True, "3")
    assert isinstance(form.scale, float)
    with pytest.raises(ValueError, match="rank must be a whole number"):  # adapters' settings too
        lofit.make_intervention("test_settings", rank="2")


# ---------------------------------------------------------------------------------------------
# The edit: shape and exactness at zero, checked at install; exceptions are one line


@dataclass
class Shrinks(lofit.LoFiT):
    name = "test_shrinks"

    def parameters(self, config):
        return {"p": (config.n_heads, config.head_dim)}

    def edit(self, attn, z, ctx):
        return z[..., :1] + attn.lofit_p[:, :1]


@dataclass
class NotZero(lofit.LoFiT):
    name = "test_not_zero"

    def parameters(self, config):
        return {"p": (config.n_heads, config.head_dim)}

    def edit(self, attn, z):
        return z * (1 + attn.lofit_p) + 1e-7


@dataclass
class Fails(lofit.LoFiT):
    """Raises in setup, or in its edit on a sequence longer than install's check uses."""
    where: str = "edit"
    name = "test_fails"

    def parameters(self, config):
        return {"p": (config.n_heads, config.head_dim)}

    def edit(self, attn, z, ctx):
        if self.where == "edit" and z.shape[1] > 4:
            raise KeyError("too long")
        return z + attn.lofit_p

    def setup(self, model, heads, init_std, generator):
        if self.where == "setup":
            raise RuntimeError("no setup today")
        return [lofit.train_rows(a, "lofit_p", list(range(4))) for a in lofit.attentions(model)]  # every head


def test_install_refuses_a_wrong_shape_and_an_edit_that_is_not_the_base_at_zero(tiny):
    model = Llama.from_pretrained(tiny)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        base = model(ids)
    with pytest.raises(lofit.FormError, match=r"test_shrinks: edit must return its input's shape \(2, 3, 4, 16\)"):
        lofit.install(model, Shrinks())
    with pytest.raises(lofit.FormError, match="test_not_zero: with every parameter at zero edit changes its input"):
        lofit.check_form(model, NotZero())
    assert type(lofit.intervention_of(model)) is lofit.LoFiT and not hasattr(model.layers[0].self_attn, "lofit_p")
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # refused: the model is as it was


def test_exceptions_in_setup_and_edit_name_the_form_and_method(tiny, monkeypatch):
    model = Llama.from_pretrained(tiny)
    with pytest.raises(lofit.FormError, match=r"the test_fails intervention's setup failed \(RuntimeError: no setup"):
        lofit.setup_stage2(model, [(0, 1)], intervention=Fails(where="setup"))
    lofit.install(model, Fails())  # install's check runs 3 tokens: fine
    with pytest.raises(lofit.FormError, match=r"test_fails intervention's edit failed \(KeyError: 'too long'\); "
                                              r"run with LOFIT_DEBUG=1"):
        model(torch.arange(1, 9)[None])
    monkeypatch.setenv("LOFIT_DEBUG", "1")
    with pytest.raises(KeyError, match="too long"):  # the original exception, with its traceback
        model(torch.arange(1, 9)[None])


def test_a_form_file_failing_in_setup_is_one_error_line(tmp_path, capsys):
    body = ("@lofit.register\n@dataclass\nclass Broken(lofit.LoFiT):\n    name = 'test_broken_setup'\n"
            "    def setup(self, model, heads, init_std, generator):\n        return 1 / 0\n")
    argv = tiny_args("mquake", tmp_path / "out", "--intervention", form_file(tmp_path, body), "--epochs", "1")
    assert train.main(argv) == 2
    assert one_error_line(capsys) == ("error: the test_broken_setup intervention's setup failed (ZeroDivisionError: "
                                      "division by zero); run with LOFIT_DEBUG=1 for the traceback")


def test_training_rows_outside_the_saved_heads_is_an_error(tiny, tmp_path):
    model = Llama.from_pretrained(tiny)
    with pytest.raises(lofit.FormError, match=r"trains lofit_p of layer 0 on heads \[0, 2, 3\] outside"):
        lofit.setup_stage2(model, [(0, 1), (1, 2)], intervention=Fails(where="none"))
    lofit.setup_stage2(model, [(0, 1), (1, 2)], intervention=lofit.LoFiT())  # LoFiT: rows (0, 1) and (1, 2) trainable
    with pytest.raises(adapter.AdapterError, match=r"lofit_v of layer 1 is trained on heads \[2\] that are not"):
        adapter.save_adapter(tmp_path / "a.safetensors", model, [(0, 1)], stage=2, task="mquake")
    assert not (tmp_path / "a.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Adapters record every form other than exactly LoFiT


@dataclass
class Subclass(lofit.LoFiT):
    """LoFiT's arithmetic under another name: its adapter must say so."""
    name = "test_lofit_subclass"


def test_a_lofit_subclass_is_recorded_and_an_unregistered_form_refused(tiny, tmp_path):
    lofit.register(Subclass)
    model = Llama.from_pretrained(tiny)
    lofit.setup_stage2(model, [(0, 1)], init_std=0.1, generator=torch.Generator().manual_seed(0),
                       intervention=Subclass())
    adapter.save_adapter(tmp_path / "a.safetensors", model, [(0, 1)], stage=2, task="mquake")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["intervention"]) == {"name": "test_lofit_subclass"} and meta["format_version"] == "2"
    fresh = Llama.from_pretrained(tiny)
    adapter.load_adapter(tmp_path / "a.safetensors", fresh)
    assert type(lofit.intervention_of(fresh)) is Subclass

    @dataclass
    class Unregistered(lofit.LoFiT):
        name = "test_unregistered"
    lofit.setup_stage2(model, [(0, 1)], intervention=Unregistered())
    with pytest.raises(adapter.AdapterError, match="not the registered form named 'test_unregistered'"):
        adapter.save_adapter(tmp_path / "b.safetensors", model, [(0, 1)], stage=2, task="mquake")


def test_train_checks_the_edit_before_stage_1(tmp_path, capsys):
    body = ("@lofit.register\n@dataclass\nclass Wide(lofit.LoFiT):\n    name = 'test_wide_edit'\n"
            "    def parameters(self, config):\n        return {'p': (config.n_heads, config.head_dim)}\n"
            "    def edit(self, attn, z, ctx):\n        return torch.cat([z, z + attn.lofit_p], dim=1)\n")
    assert train.main(tiny_args("mquake", tmp_path / "out", "--intervention", form_file(tmp_path, body))) == 2
    line = one_error_line(capsys)
    assert "test_wide_edit: edit must return its input's shape (2, 3, 8, 8)" in line and "returned (2, 6, 8, 8)" in line
    log = tmp_path / "out" / "metrics.jsonl"
    assert not log.exists() or not log.read_text().strip()  # no training step ran


@dataclass
class BadMerge(lofit.LoFiT):
    """Affine in z, but its merge doubles o_proj even at zero."""
    name = "test_bad_merge"

    def merge(self, attn, weight, bias):
        return 2 * weight, bias


def test_check_form_refuses_a_merge_that_is_not_the_identity_at_zero(tiny):
    model = Llama.from_pretrained(tiny)
    with pytest.raises(lofit.FormError, match="test_bad_merge: merge changes the weights with every parameter at zero"):
        lofit.check_form(model, BadMerge())
    assert type(lofit.intervention_of(model)) is lofit.LoFiT
    lofit.check_form(model, lofit.LoFiT())  # LoFiT passes its own checks


@dataclass
class MergeFails(lofit.LoFiT):
    """Fine at zero; its merge raises once its parameter moved."""
    name = "test_merge_fails"

    def parameters(self, config):
        return {"p": (config.n_heads, config.head_dim)}

    def edit(self, attn, z, ctx):
        return z + attn.lofit_p

    def merge(self, attn, weight, bias):
        if attn.lofit_p.any():
            raise ArithmeticError("cannot fold p")
        return weight, bias


def test_an_exception_in_merge_is_one_line(tiny):
    model = Llama.from_pretrained(tiny)
    lofit.check_form(model, MergeFails())
    lofit.install(model, MergeFails())
    with torch.no_grad():
        model.layers[0].self_attn.lofit_p[1, 0] = 1.0
    with pytest.raises(lofit.FormError, match=r"test_merge_fails intervention's merge failed \(ArithmeticError"):
        adapter.merge_offsets(model)
