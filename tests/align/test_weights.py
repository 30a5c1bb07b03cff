"""torch -> Paddle weight conversion: names, layouts, rules, files, and refusing bad input."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
from align_twins import PaddleNet, TorchNet, make_batch, twins  # noqa: E402

import reprod  # noqa: E402
from reprod.align import (  # noqa: E402
    ConversionRules,
    HeuristicLinearWarning,
    check_fits,
    convert,
    load_into_paddle,
    torch_to_paddle,
)
from reprod.align.rules import guess_linear_weight, plan_conversion  # noqa: E402
from reprod.storage.framework_files import load_weights_as_dump, read_pdparams, write_pdparams  # noqa: E402


def _torch_net(seed: int = 0) -> TorchNet:
    torch.manual_seed(seed)
    net = TorchNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.num_batches_tracked.fill_(7)
    return net


def _forward_both(tm: TorchNet, pm: PaddleNet, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    inputs, _ = make_batch(seed)
    tm.eval()
    pm.eval()
    with torch.no_grad():
        a = tm(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    b = pm(**{k: paddle.to_tensor(v) for k, v in inputs.items()}).numpy()
    return a, b


# --- the conversion itself ---------------------------------------------------------------------


def test_converted_state_dict_matches_torch_values_and_paddle_layout() -> None:
    tm = _torch_net()
    sd = tm.state_dict()
    w = torch_to_paddle(sd, model=tm)
    pm = PaddleNet()
    expected_keys = list(pm.state_dict())
    assert list(w) == expected_keys  # same names, same order as the Paddle model
    np.testing.assert_array_equal(w["fc1.weight"], sd["fc1.weight"].numpy().T)
    np.testing.assert_array_equal(w["head.weight"], sd["head.weight"].numpy().T)
    np.testing.assert_array_equal(w["bn._mean"], sd["bn.running_mean"].numpy())
    np.testing.assert_array_equal(w["bn._variance"], sd["bn.running_var"].numpy())
    # conv, embedding, layernorm keep the torch layout
    for k in ("conv.weight", "emb.weight", "norm.weight", "conv.bias"):
        np.testing.assert_array_equal(w[k], sd[k].numpy())
    assert "bn.num_batches_tracked" not in w
    assert all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in w.values())


def test_converted_weights_load_into_paddle_and_forward_aligns() -> None:
    tm = _torch_net()
    pm = PaddleNet()
    pm.set_state_dict(torch_to_paddle(tm.state_dict(), model=tm))
    a, b = _forward_both(tm, pm)
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert reprod.compare({"logits": a}, {"logits": b}, threshold=1e-5).passed


def test_linear_weights_come_from_the_model_not_from_shapes() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)  # square: a shape rule cannot tell
            self.table = torch.nn.Parameter(torch.randn(3, 5))  # 2-D, named like nothing

    m = Odd()
    conv = convert(m.state_dict(), model=m)
    actions = {p.torch_name: p.action for p in conv.plan}
    assert actions == {"proj.weight": "transpose", "proj.bias": "copy", "table": "copy"}
    np.testing.assert_array_equal(conv.weights["proj.weight"], m.proj.weight.detach().numpy().T)
    assert conv.linear_source == "model"


def test_without_model_the_heuristic_decides_and_says_so() -> None:
    tm = _torch_net()
    with pytest.warns(HeuristicLinearWarning, match="fc1.weight.*head.weight|guessed"):
        conv = convert(tm.state_dict())
    assert conv.linear_source == "heuristic"
    transposed = {p.torch_name for p in conv.by_action("transpose")}
    assert transposed == {"fc1.weight", "head.weight"}  # not emb.weight (2-D embedding)
    # and here the heuristic agrees with the model
    assert conv.weights.keys() == torch_to_paddle(tm.state_dict(), model=tm).keys()


@pytest.mark.parametrize(
    ("name", "shape", "linear"),
    [
        ("classifier.weight", (10, 64), True),
        ("blocks.0.mlp.fc2.weight", (64, 256), True),
        ("stem.conv.weight", (8, 3), False),  # a 1x1 conv squeezed to 2-D is still a conv
        ("encoder.word_embeddings.weight", (100, 32), False),
        ("wte.weight", (100, 32), False),
        ("head.bias", (10,), False),
        ("fc.weight_ih_l0", (16, 8), False),  # LSTM weights keep their layout
        ("conv1.weight", (8, 3, 3, 3), False),
        ("model.embed_tokens.weight", (100, 32), False),
        ("encoder.embed_positions.weight", (64, 32), False),
        ("tok_emb.weight", (100, 32), False),
        ("emb.weight", (100, 32), False),
        ("embeddings.0.weight", (100, 32), False),  # a Sequential's index: its container's name
        # diffusers: Linears whose names hold "emb" (left untransposed before)
        ("time_embedding.linear_1.weight", (128, 32), True),
        ("down_blocks.0.resnets.0.time_emb_proj.weight", (32, 128), True),
        ("convnext.stages.0.fc1.weight", (64, 16), True),
    ],
)
def test_heuristic_rule(name: str, shape: tuple[int, ...], linear: bool) -> None:
    assert guess_linear_weight(name, shape) is linear


def test_user_rules_rename_skip_transpose() -> None:
    sd = {
        "module.backbone.conv.weight": torch.randn(2, 3, 3, 3),
        "module.backbone.bn.running_mean": torch.randn(2),
        "module.head.weight": torch.randn(4, 2),
        "module.aux.weight": torch.randn(2, 2),
        "module.attn.in_proj_weight": torch.randn(6, 2),
    }
    rules = ConversionRules(
        rename=[(r"^module\.", ""), (r"^backbone\.", "body.")],
        skip=[r"\.aux\."],
        transpose=[r"in_proj_weight$"],
        no_transpose=[r"head\.weight$"],
    )
    conv = convert(sd, rules=rules)
    assert list(conv.weights) == [
        "body.conv.weight",
        "body.bn._mean",
        "head.weight",
        "attn.in_proj_weight",
    ]
    np.testing.assert_array_equal(conv.weights["head.weight"], sd["module.head.weight"].numpy())
    np.testing.assert_array_equal(
        conv.weights["attn.in_proj_weight"], sd["module.attn.in_proj_weight"].numpy().T
    )
    assert [p.action for p in conv.plan if p.torch_name == "module.aux.weight"] == ["skip"]


def test_rules_from_cli_strings_and_bad_rules() -> None:
    r = ConversionRules.from_strings(rename=["^a\\.=b.", "x=y=z"], skip=["s"])
    assert r.rename == (("^a\\.", "b."), ("x", "y=z"))
    assert r.paddle_name("a.k.running_var") == "b.k._variance"
    with pytest.raises(reprod.ReprodError, match="PATTERN=REPLACEMENT"):
        ConversionRules.from_strings(rename=["nothing"])
    with pytest.raises(reprod.ReprodError, match="not a valid regular expression"):
        ConversionRules(skip=["(unclosed"])
    with pytest.raises(reprod.ReprodError, match="invalid"):
        ConversionRules(rename=[("a", r"\2")])


def test_rules_that_collide_or_transpose_non_2d_are_refused() -> None:
    shapes = {"a.weight": (2, 2), "b.weight": (2, 2), "c.weight": (2, 2, 2)}
    with pytest.raises(reprod.ReprodError, match="a.weight and b.weight -> x.weight"):
        plan_conversion(shapes, rules=ConversionRules(rename=[(r"^[ab]\.", "x.")]))
    with pytest.raises(reprod.ReprodError, match=r"not 2-D: c.weight \[2, 2, 2\]"):
        plan_conversion(shapes, rules=ConversionRules(transpose=["^c"]))


def test_bfloat16_weights_become_float32_and_are_recorded() -> None:
    sd = {"fc.weight": torch.randn(3, 2).to(torch.bfloat16)}
    conv = convert(sd, rules=ConversionRules(no_transpose=["fc"]))
    assert conv.weights["fc.weight"].dtype == np.float32
    np.testing.assert_array_equal(conv.weights["fc.weight"], sd["fc.weight"].float().numpy())
    assert conv.source_dtypes == {"fc.weight": "bfloat16"}


# --- state dicts that do not fit ---------------------------------------------------------------


def test_state_dict_that_does_not_fit_the_torch_model_lists_every_offender() -> None:
    tm = _torch_net()
    sd = dict(tm.state_dict())
    sd.pop("conv.bias")
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(2)
    sd["head.bias"] = torch.zeros(7)
    with pytest.raises(reprod.KeyMismatchError) as info:
        convert(sd, model=tm)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in ("conv.bias", "norm.weight", "extra.weight", "head.bias [7] vs model [5]"):
        assert needle in msg


def test_weights_that_do_not_fit_the_paddle_model_list_every_offender() -> None:
    tm = _torch_net()
    w = torch_to_paddle(tm.state_dict(), model=tm)
    w.pop("bn._variance")
    w["fc1.weight"] = np.ascontiguousarray(w["fc1.weight"].T)  # as if the transpose had been missed
    w["emb.weight"] = w["emb.weight"].astype(np.float64)
    w["stray"] = np.zeros(1, np.float32)
    pm = PaddleNet()
    before = {k: v.numpy().copy() for k, v in pm.state_dict().items()}
    with pytest.raises(reprod.KeyMismatchError) as info:
        load_into_paddle(pm, w)
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing 1 key(s): bn._variance" in msg
    assert "unexpected 1 key(s): stray" in msg
    assert "fc1.weight [16, 8] vs model [8, 16] (transposed" in msg
    assert "emb.weight float64 vs model float32" in msg
    # nothing was loaded: Paddle's own set_state_dict would have loaded the rest and only warned
    for k, v in pm.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k])


def test_load_into_paddle_from_a_torch_model_matches_set_state_dict() -> None:
    tm, pm = twins(seed=4)
    for k, v in torch_to_paddle(tm, model=tm).items():
        np.testing.assert_array_equal(pm.state_dict()[k].numpy(), v)
    check_fits(pm, torch_to_paddle(tm))  # a torch module alone is its own model


# --- files -------------------------------------------------------------------------------------


def test_pth_to_pdparams_round_trip_through_paddle_load(tmp_path) -> None:
    tm = _torch_net()
    torch.save(tm.state_dict(), tmp_path / "m.pth")
    out = write_pdparams(tmp_path / "m.pdparams", torch_to_paddle(tmp_path / "m.pth", model=tm))
    assert out == str(tmp_path / "m.pdparams")
    pm = PaddleNet()
    missing, unexpected = pm.set_state_dict(paddle.load(out))
    assert (missing, unexpected) == ([], [])
    a, b = _forward_both(tm, pm)
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    # our safe reader agrees with paddle.load bit for bit
    ours = read_pdparams(out)
    theirs = paddle.load(out, return_numpy=True)
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_write_is_atomic_and_keeps_the_old_file_on_failure(tmp_path) -> None:
    target = tmp_path / "m.pdparams"
    write_pdparams(target, {"a": np.ones(2, np.float32)})
    with pytest.raises(reprod.UnsupportedValueError):
        write_pdparams(target, {"a": np.zeros(2, np.float32), "b": "not an array"})
    np.testing.assert_array_equal(read_pdparams(target)["a"], np.ones(2, np.float32))
    assert os.listdir(tmp_path) == ["m.pdparams"]  # no temporary file left behind


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_read_pdparams_written_by_paddle_save(tmp_path, protocol: int) -> None:
    paddle.seed(1)
    pm = PaddleNet()
    path = str(tmp_path / "p.pdparams")
    paddle.save(pm.state_dict(), path, protocol=protocol)
    ours = read_pdparams(path)
    assert "StructuredToParameterName@@" not in ours
    want = {k: v.numpy() for k, v in pm.state_dict().items()}
    assert list(ours) == list(want)
    for k in want:
        np.testing.assert_array_equal(ours[k], want[k])


def test_read_pdparams_joins_big_tensor_slices_like_paddle_load(tmp_path) -> None:
    # paddle.save (protocols 2/3) slices tensors over 2**30 elements like this; built small here
    w = np.arange(10, dtype=np.float32).reshape(2, 5)
    flat = w.reshape(-1)
    saved = {
        "b": np.ones(3, np.float32),
        "w@@.0": flat[:6],
        "w@@.1": flat[6:],
        "UnpackBigParamInfor@@": {"w": {"OriginShape": (2, 5), "slices": ["w@@.0", "w@@.1"]}},
    }
    path = str(tmp_path / "big.pdparams")
    with open(path, "wb") as f:
        pickle.dump(saved, f, protocol=2)
    ours = read_pdparams(path)
    theirs = paddle.load(path, return_numpy=True)
    assert sorted(ours) == sorted(theirs) == ["b", "w"]
    np.testing.assert_array_equal(ours["w"], theirs["w"])
    np.testing.assert_array_equal(ours["w"], w)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pdparams_raises_unsafe_and_runs_nothing(tmp_path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pdparams"
    with open(path, "wb") as f:
        pickle.dump({"w": np.ones(2, np.float32), "x": _Exploit(str(marker))}, f, protocol=protocol)
    for reader in (read_pdparams, load_weights_as_dump):
        with pytest.raises(reprod.UnsafeDumpError) as info:
            reader(path)
        msg = str(info.value)
        assert str(path) in msg and "system" in msg and "\n" not in msg
    pm = PaddleNet()
    with pytest.raises(reprod.UnsafeDumpError):
        load_into_paddle(pm, str(path))
    assert not marker.exists()


def test_malicious_pth_is_refused_by_weights_only(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": _Exploit(str(marker))}, path)
    with pytest.raises(reprod.DumpFormatError, match="system"):
        torch_to_paddle(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("notes.pth", b"hello, I am text", "neither a zip archive nor a pickle"),
        ("whole.pth", None, "save model.state_dict() instead"),
        ("swapped.pth", "pdparams", "a Paddle .pdparams"),
        ("missing.pth", "skip", "no such file"),
        ("counter.pth", "counter", "not a state dict"),
        ("weights.txt", b"x", "unknown weight file suffix"),
    ],
)
def test_conversion_refuses_wrong_files_with_one_clear_line(
    tmp_path, name, content, needle, assert_one_line_error
) -> None:
    path = tmp_path / name
    if content is None:
        torch.save(torch.nn.Linear(2, 2), path)
    elif content == "pdparams":
        paddle.save(PaddleNet().state_dict(), str(path))
    elif content == "counter":
        torch.save({"epoch": 3}, path)
    elif content != "skip":
        path.write_bytes(content)
    with pytest.raises(reprod.DumpFormatError) as info:
        load_weights_as_dump(path)
    assert needle in str(info.value)
    assert_one_line_error(info.value, path)


def test_pdparams_reader_refuses_a_torch_file(tmp_path, assert_one_line_error) -> None:
    path = tmp_path / "m.pdparams"
    torch.save(_torch_net().state_dict(), path)
    with pytest.raises(reprod.DumpFormatError, match="torch.save file") as info:
        read_pdparams(path)
    assert_one_line_error(info.value, path)


def test_training_checkpoint_wrapping_is_unwrapped(tmp_path) -> None:
    tm = _torch_net()
    torch.save({"epoch": 3, "state_dict": tm.state_dict(), "best": 0.5}, tmp_path / "ckpt.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HeuristicLinearWarning)
        got = load_weights_as_dump(tmp_path / "ckpt.pth")
    want = torch_to_paddle(tm.state_dict(), model=tm)
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_weight_files_of_both_frameworks_compare_equal(tmp_path) -> None:
    tm, pm = twins(seed=2)
    torch.save(tm.state_dict(), tmp_path / "m.pth")
    paddle.save(pm.state_dict(), str(tmp_path / "m.pdparams"))
    a = load_weights_as_dump(tmp_path / "m.pth", model=tm)
    b = load_weights_as_dump(tmp_path / "m.pdparams")
    assert reprod.compare(a, b, method="max", threshold=0.0).passed
    # and a changed weight is found
    with torch.no_grad():
        tm.head.weight[1, 2] += 1e-3
    torch.save(tm.state_dict(), tmp_path / "m.pth")
    r = reprod.compare(
        load_weights_as_dump(tmp_path / "m.pth", model=tm), b, method="max", threshold=1e-6
    )
    assert [k.key for k in r.failed] == ["head.weight"]
    assert r["head.weight"].worst_index == (2, 1)  # Paddle layout: the transpose of torch's (1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("by_order", [False, True])
def test_a_loaded_port_holds_its_own_weights(dtype, by_order) -> None:
    # load_into_paddle converts without copying (set_state_dict copies): what it loaded must
    # still be Paddle's own memory, untouched when the torch model trains on
    tm = _torch_net().to(dtype)
    pm = PaddleNet()
    pm.to(dtype={torch.float32: "float32", torch.float16: "float16",
                 torch.float64: "float64"}[dtype])
    load_into_paddle(pm, tm, by_order=by_order)
    loaded = {k: v.numpy().copy() for k, v in pm.state_dict().items()}
    expected = torch_to_paddle(tm, model=tm)
    assert set(expected) <= set(loaded)
    for k, v in expected.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)
    with torch.no_grad():
        for t in tm.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.add_(3)
    for k, v in pm.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), loaded[k], err_msg=k)


def test_convert_s_arrays_are_their_own_unless_asked_otherwise() -> None:
    tm = _torch_net()
    conv, views = convert(tm, model=tm), convert(tm, model=tm, copy=False)
    bias = tm.head.bias.detach().numpy()
    assert not np.shares_memory(conv.weights["head.bias"], bias)
    assert np.shares_memory(views.weights["head.bias"], bias)
    # a transposed weight is the transpose's own either way
    assert not np.shares_memory(views.weights["head.weight"], tm.head.weight.detach().numpy())
    for k in conv.weights:
        np.testing.assert_array_equal(conv.weights[k], views.weights[k], err_msg=k)


class _TorchScale(torch.nn.Module):
    """CLIP's ``logit_scale``: a 0-d parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))


class _PaddleScale(paddle.nn.Layer):
    """PaddleNLP's: ``create_parameter([1])``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(3, 2)
        self.logit_scale = self.create_parameter([1])


def test_a_parameter_apart_only_by_unit_axes_loads_reshaped() -> None:
    # before: "wrong shape: logit_scale [] vs model [1]", and no rule could reshape it
    torch.manual_seed(0)
    tm, pm = _TorchScale(), _PaddleScale()
    load_into_paddle(pm, tm)
    np.testing.assert_allclose(pm.logit_scale.numpy(), [2.6592], rtol=1e-7)
    np.testing.assert_array_equal(pm.fc.weight.numpy(), tm.fc.weight.detach().numpy().T)
    # a size that differs is still refused
    with pytest.raises(reprod.KeyMismatchError, match=r"logit_scale \[2\] vs model \[1\]"):
        check_fits(pm, {"fc.weight": np.zeros((3, 2), np.float32),
                        "fc.bias": np.zeros(2, np.float32),
                        "logit_scale": np.zeros(2, np.float32)})
