"""Bad input through the command line: damaged checkpoint headers, absurd config.json values, images too
big to decode or to resize. Each ends in one line `refvit: error: ...` on stderr and exit code 2 — fast, and
in bounded memory (the cases that would otherwise allocate gigabytes run in a child process under a 1 GiB
address-space limit, and are timed) — or is handled correctly.
"""
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ckptfiles import TIMM_TINY, random_params, timm_config_json, tiny, write_dir
from weights_tools import to_hf_names, write_safetensors
from refvit.cli import main
from refvit.preprocess import MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV, ImageError, open_image

MEMORY_LIMIT = 2**30


def cli(capsys, *args) -> tuple:
    """Run the CLI in this process -> (exit code, stdout, stderr)."""
    start = time.perf_counter()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert time.perf_counter() - start < 5
    return code, out, err


def cli_limited(*args, env=None) -> tuple:
    """Run the CLI in a child process under a 1 GiB address-space limit -> (exit code, stdout, stderr)."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0}))\n"
            "from refvit.cli import main; sys.exit(main(sys.argv[1:]))").format(MEMORY_LIMIT)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"OPENBLAS_NUM_THREADS": "1"} | (env or {}))
    assert time.perf_counter() - start < 30
    return out.returncode, out.stdout, out.stderr


def assert_one_line_error(code, err, *fragments):
    """Exit code 2; stderr ends in one line `refvit: error: ...` (notes may come before it), no traceback."""
    assert code == 2, err
    lines = err.splitlines()
    assert err.endswith("\n") and lines[-1].startswith("refvit: error: "), err
    assert err.count("refvit: error:") == 1 and "Traceback" not in err, err
    err = lines[-1]
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- checkpoint headers

def raw_safetensors(path, header, data=b"", header_bytes=None):
    blob = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADERS = {  # name -> (header dict or raw bytes, data, expected fragment)
    "nested_json": (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nests JSON too deeply"),
    "dtype_list": ({"x": {**F32, "dtype": ["F32"]}}, bytes(8), "tensor 'x': dtype must be a string, got ['F32']"),
    "dtype_number": ({"x": {**F32, "dtype": 32}}, bytes(8), "tensor 'x': dtype must be a string, got 32"),
    "dtype_null": ({"x": {**F32, "dtype": None}}, bytes(8), "tensor 'x': dtype must be a string, got None"),
    "dtype_object": ({"x": {**F32, "dtype": {"F32": 1}}}, bytes(8), "dtype must be a string"),
    "trailing_bytes": ({"x": F32}, bytes(12), "4 trailing bytes after the last tensor's data"),
    "gap": ({"x": F32, "y": {**F32, "data_offsets": [12, 20]}}, bytes(20),
            "a gap of 4 bytes in the data region before tensor 'y'"),
    "gap_first": ({"x": {**F32, "data_offsets": [4, 12]}}, bytes(12), "a gap of 4 bytes in the data region"),
    "huge_header_length": (None, None, "header length"),
}


@pytest.mark.parametrize("case", HEADERS)
def test_damaged_header(tmp_path, capsys, case):
    header, data, fragment = HEADERS[case]
    path = tmp_path / "m.safetensors"
    if case == "huge_header_length":
        path.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    elif isinstance(header, bytes):
        raw_safetensors(path, None, data, header)
    else:
        raw_safetensors(path, header, data)
    code, out, err = cli(capsys, "info", path)
    assert_one_line_error(code, err, str(path), fragment)


def tiny_timm(tmp_path, edit, name="m.safetensors", **config):
    """A tiny DeiT (width 128, 4 heads stated by --num-heads) with one edit to its tensors."""
    params = random_params(tiny(embed_dim=128, num_heads=4, **config))
    edit(params)
    path = tmp_path / name
    write_safetensors(path, params)
    return path


WRONG_RANK = {  # the shapes config inference reads, and others, of the wrong rank
    "patch_embed_rank3": ("patch_embed.proj.weight", (128, 3, 16), "'patch_embed.proj.weight' has shape (128, 3, 16), "
                                                                   "expected rank 4"),
    "pos_embed_rank2": ("pos_embed", (5, 128), "'pos_embed' has shape (5, 128), expected rank 3"),
    "pos_embed_rank4": ("pos_embed", (1, 5, 128, 1), "'pos_embed' has shape (1, 5, 128, 1), expected rank 3"),
    "fc1_rank1": ("blocks.0.mlp.fc1.weight", (256,), "'blocks.0.mlp.fc1.weight' has shape (256,), expected rank 2"),
    "head_rank1": ("head.weight", (3,), "'head.weight' has shape (3,), expected rank 2"),
    "cls_token_rank1": ("cls_token", (128,), "wrong shape: cls_token (128,), expected (1, 1, 128)"),
    "qkv_rank3": ("blocks.1.attn.qkv.weight", (3, 128, 128), "wrong shape: blocks.1.attn.qkv.weight (3, 128, 128)"),
}


@pytest.mark.parametrize("case", WRONG_RANK)
def test_tensor_of_the_wrong_rank(tmp_path, capsys, case):
    name, shape, fragment = WRONG_RANK[case]
    path = tiny_timm(tmp_path, lambda p: p.update({name: np.zeros(shape, np.float32)}))
    code, _, err = cli(capsys, "info", path, "--num-heads", 4)
    assert_one_line_error(code, err, str(path), fragment)


ZERO_SIZE = {
    "patch_embed": ("patch_embed.proj.weight", (0, 3, 4, 4), "width 0 is not in [1, 8192]"),
    "pos_embed": ("pos_embed", (1, 0, 128), "'pos_embed' has 0 tokens"),
    "fc1": ("blocks.0.mlp.fc1.weight", (0, 128), "mlp_ratio must be in (0, 65536], got 0.0"),
    "head": ("head.weight", (0, 128), "0 classes, not distilled, head_mode 'cls'): unexpected: head.bias, head.weight"),
    "cls_token": ("cls_token", (1, 1, 0), "wrong shape: cls_token (1, 1, 0), expected (1, 1, 128)"),
    "norm": ("norm.weight", (0,), "wrong shape: norm.weight (0,), expected (128,)"),
}


@pytest.mark.parametrize("case", ZERO_SIZE)
def test_zero_size_tensor(tmp_path, capsys, case):
    name, shape, fragment = ZERO_SIZE[case]
    path = tiny_timm(tmp_path, lambda p: p.update({name: np.zeros(shape, np.float32)}))
    code, _, err = cli(capsys, "info", path, "--num-heads", 4)
    assert_one_line_error(code, err, str(path), fragment)


def test_all_tensors_zero_size(tmp_path, capsys):
    path = tiny_timm(tmp_path, lambda p: p.update({n: np.zeros((0,) * a.ndim, np.float32) for n, a in p.items()}))
    code, _, err = cli(capsys, "info", path, "--num-heads", 4)
    assert_one_line_error(code, err, str(path))


@pytest.mark.parametrize("values, fragment", [
    ({"blocks.1.attn.proj.weight": [np.nan]}, "tensor 'blocks.1.attn.proj.weight' holds 1 NaN and 0 infinite values"),
    ({"norm.bias": [np.inf, -np.inf, np.nan]}, "tensor 'norm.bias' holds 1 NaN and 2 infinite values"),
    ({"cls_token": [np.nan], "head.weight": [np.inf]}, "tensor 'cls_token' holds 1 NaN and 0 infinite values "
                                                      "(and 1 more tensors)"),
])
@pytest.mark.parametrize("command", ["info", "classify"])
def test_non_finite_weights_are_named_never_printed(tmp_path, capsys, image, values, fragment, command):
    def edit(p):
        for name, vals in values.items():
            p[name].reshape(-1)[:len(vals)] = vals
    path = tiny_timm(tmp_path, edit)
    args = ["info", path] if command == "info" else ["classify", image, "--weights", path, "--json"]
    code, out, err = cli(capsys, *args, "--num-heads", 4)
    assert_one_line_error(code, err, str(path), fragment)
    assert "nan" not in out.lower() and out == ""


def test_float64_too_large_for_float32_is_refused(tmp_path, capsys):
    params = {n: a.astype(np.float64) for n, a in random_params(tiny(embed_dim=128, num_heads=4)).items()}
    params["blocks.0.mlp.fc2.bias"][3] = 1e300
    write_safetensors(tmp_path / "m.safetensors", params)
    code, _, err = cli(capsys, "info", tmp_path / "m.safetensors", "--num-heads", 4)
    assert_one_line_error(code, err, "tensor 'blocks.0.mlp.fc2.bias' holds 0 NaN and 1 infinite values")


# ---------------------------------------------------------------- config.json values

CONFIG = tiny(embed_dim=128, num_heads=4)
HF_CONFIG = CONFIG.replace(distilled=True)  # every HF DeiT has a distillation token


def params_for(layout):
    return to_hf_names(random_params(HF_CONFIG)) if layout == "hf" else random_params(CONFIG)


def hf_json(**changes):
    c = CONFIG
    return {"model_type": "deit", "image_size": c.img_size, "patch_size": c.patch_size, "num_channels": 3,
            "hidden_size": c.embed_dim, "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
            "intermediate_size": c.hidden_dim, "qkv_bias": True, "layer_norm_eps": 1e-12,
            "id2label": {str(i): str(i) for i in range(c.num_classes)}} | changes


def timm_json(args=None, pretrained=None, **top):
    cfg = timm_config_json(CONFIG)
    cfg["model_args"] |= args or {}
    cfg["pretrained_cfg"] |= pretrained or {}
    return cfg | top


ABSURD = {  # name -> (layout, config.json, expected fragment)
    "timm_depth_1e6": ("timm", timm_json({"depth": 10**6}), "model_args.depth: depth must be in [1, 256] (MAX_DEPTH"),
    "timm_depth_1e9": ("timm", timm_json({"depth": 10**9}), "model_args.depth: depth must be in [1, 256]"),
    "timm_width_0": ("timm", timm_json({"embed_dim": 0}), "model_args.embed_dim: embed_dim must be in [1, 8192]"),
    "timm_heads_not_dividing": ("timm", timm_json({"num_heads": 3}),
                                "embed_dim 128 is not divisible by num_heads 3 (heads from config.json"),
    "timm_heads_huge": ("timm", timm_json({"num_heads": 10**9}), "num_heads must be in [1, 64] (MAX_NUM_HEADS"),
    "timm_img_huge": ("timm", timm_json({"img_size": 10**9}), "model_args.img_size: img_size must be in [1, 4096]"),
    "timm_img_rect": ("timm", timm_json({"img_size": [8, 16]}), "model_args.img_size must be an integer, got [8, 16]"),
    "timm_patch_0": ("timm", timm_json({"patch_size": 0}), "patch_size must be in [1, 512]"),
    "timm_depth_float": ("timm", timm_json({"depth": 2.0}), "model_args.depth must be an integer, got 2.0"),
    "timm_depth_string": ("timm", timm_json({"depth": "2"}), "model_args.depth must be an integer, got '2'"),
    "timm_depth_bool": ("timm", timm_json({"depth": True}), "model_args.depth must be an integer, got True"),
    "timm_mlp_ratio_huge": ("timm", timm_json({"mlp_ratio": 1e308}), "mlp_ratio must be in (0, 65536]"),
    "timm_mlp_ratio_nan": ("timm", timm_json({"mlp_ratio": float("nan")}), "mlp_ratio must be a finite number"),
    "timm_classes_huge": ("timm", timm_json(num_classes=10**12), "num_classes: num_classes must be in [0, 100000]"),
    "timm_input_size_huge": ("timm", timm_json(pretrained={"input_size": [3, 10**9, 10**9]}),
                             "pretrained_cfg.input_size [3, 1000000000, 1000000000] is out of bounds"),
    "timm_crop_pct_0": ("timm", timm_json(pretrained={"crop_pct": 0}), "pretrained_cfg.crop_pct must be a number in (0, 1]"),
    "timm_std_0": ("timm", timm_json(pretrained={"std": [0.2, 0, 0.2]}), "pretrained_cfg.std must be positive"),
    "timm_mean_strings": ("timm", timm_json(pretrained={"mean": ["a"]}), "pretrained_cfg.mean must be a list of finite"),
    "timm_model_args_list": ("timm", timm_json() | {"model_args": [1]}, "model_args must be an object, got list"),
    "timm_arch_number": ("timm", timm_json(architecture=3), "architecture must be a timm model name, got 3"),
    "timm_layer_scale": ("timm", timm_json({"init_values": 0.1}), "missing: blocks.0.ls1.gamma, blocks.0.ls2.gamma"),
    "timm_no_class_token": ("timm", timm_json({"class_token": False}),
                            "model_args.class_token = False is not supported: it means no class token"),
    "hf_depth_1e9": ("hf", hf_json(num_hidden_layers=10**9), "num_hidden_layers: depth must be in [1, 256]"),
    "hf_width_0": ("hf", hf_json(hidden_size=0), "hidden_size: embed_dim must be in [1, 8192]"),
    "hf_heads_not_dividing": ("hf", hf_json(num_attention_heads=3), "embed_dim 128 is not divisible by num_heads 3"),
    "hf_intermediate_huge": ("hf", hf_json(intermediate_size=10**400), "intermediate_size must be in [1, 65536]"),
    "hf_eps_huge": ("hf", hf_json(layer_norm_eps=10**400), "layer_norm_eps: ln_eps must be a finite number"),
    "hf_eps_negative": ("hf", hf_json(layer_norm_eps=-1.0), "ln_eps must be in (0, 1.0]"),
    "nested": ("raw", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "cannot read as JSON (nested too deeply)"),
    "not_object": ("raw", "[1, 2]", "expected a JSON object, got a list"),
    "huge_number_text": ("raw", '{"hidden_size": ' + "9" * 5000 + "}", "cannot read as JSON"),
}


@pytest.mark.parametrize("case", ABSURD)
def test_absurd_config_json_is_refused_before_allocating(tmp_path, capsys, case):
    layout, config_json, fragment = ABSURD[case]
    directory = write_dir(tmp_path / "m", params_for(layout), config_json)
    tracemalloc.start()
    code, _, err = cli(capsys, "info", directory)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert_one_line_error(code, err, str(directory), fragment)
    assert peak < 64 * 2**20  # a billion-block parameter table would be gigabytes


def test_config_json_too_big(tmp_path, capsys):
    directory = write_dir(tmp_path / "m", random_params(CONFIG), timm_json(pad="x" * (17 * 2**20)))
    code, _, err = cli(capsys, "info", directory)
    assert_one_line_error(code, err, "config.json", "above the 16777216-byte limit for a config.json")


def test_sane_config_json_still_loads(tmp_path, capsys):
    for layout, config_json in (("timm", timm_json()), ("hf", hf_json())):
        directory = write_dir(tmp_path / layout, params_for(layout), config_json)
        code, out, err = cli(capsys, "info", directory)
        assert code == 0 and "embed_dim    128" in out and "num_heads    4" in out, err


# ---------------------------------------------------------------- images

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height (8-bit gray) with a few bytes of pixel data: a decompression
    bomb as far as a decoder trusting the header is concerned."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def wide_png(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((2, 100_000), np.uint8)).save(path)  # 100000 x 2: 200,000 pixels, decodes fine
    return path


def test_open_image_checks_the_decoded_size_before_decoding(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        open_image(path)
    assert time.perf_counter() - start < 1
    message = str(info.value)
    assert f"is 100000x100000 = 10,000,000,000 pixels, too many to decode: the limit is {MAX_IMAGE_PIXELS:,}" in message
    assert f"set the environment variable {MAX_IMAGE_PIXELS_ENV}" in message


def test_open_image_checks_the_resized_size(wide_png):
    assert open_image(wide_png).size == (100_000, 2)  # decoding it is fine; resizing it is not
    with pytest.raises(ImageError, match=r"is 100000x2: resized to 248 pixels on its short side it would be "
                                         r"12400000x248 = 3,075,200,000 pixels, too many: the limit is 67,108,864"):
        open_image(wide_png, resize_short=248)
    assert open_image(wide_png, resize_short=248, max_pixels=4 * 10**9).size == (100_000, 2)


def test_the_limit_can_be_raised(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((1000, 1200), np.uint8)).save(path)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1000000")
    with pytest.raises(ImageError, match=r"1200x1000 = 1,200,000 pixels, too many to decode: the limit is 1,000,000"):
        open_image(path)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1200000")
    assert open_image(path).size == (1200, 1000)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(ImageError, match=f"{MAX_IMAGE_PIXELS_ENV} must be a positive integer"):
        open_image(path)


def test_pillows_own_limit_does_not_apply(tmp_path, monkeypatch):
    """Pillow's MAX_IMAGE_PIXELS (DecompressionBombError, which escaped as a traceback) is replaced by ours,
    so raising ours raises the only limit."""
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((1000, 1200), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert open_image(path).size == (1200, 1000)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_cli_decompression_bomb(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    code, out, err = cli_limited("classify", path)
    assert_one_line_error(code, err, str(path), "too many to decode", MAX_IMAGE_PIXELS_ENV)


@pytest.mark.shared
def test_cli_image_too_big_to_resize(wide_png):
    """The issue's case: a 100000x2 PNG resized to 248 px on the short side for a 224 model needs gigabytes."""
    code, out, err = cli_limited("classify", wide_png, "--weights", TIMM_TINY)
    assert_one_line_error(code, err, str(wide_png), "12400000x248", MAX_IMAGE_PIXELS_ENV)


def test_cli_unreadable_image(tmp_path, capsys):
    path = tmp_path / "not.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    code, _, err = cli(capsys, "classify", path)
    assert_one_line_error(code, err, f"cannot read image {path}")
