"""Task specs, loaders and batching (runtime §2, §10)."""

import collections
import hashlib
import io
import os
import pickle
import re
import struct
import time

import attrs
import numpy as np
import pytest
import torch

from esper.tasks import DataError, Split, TaskData, eval_batches, get_task, load_task, train_batches
from esper.tasks import cifar, spec

# --- specs ------------------------------------------------------------------------------


def test_specs_follow_the_task_table():
    digits, text = get_task("digits"), get_task("text")
    assert (digits.batch_size, digits.default_epochs, digits.classes, digits.score_kind) == (64, 30, 10, "accuracy")
    assert digits.host_optimizer == spec.OptimizerSpec("sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert digits.seed_optimizer.weight_decay == 0.0
    assert (text.topology, text.host_preset, text.score_kind, text.steps_per_epoch) == ("transformer", "tiny", "loss", 200)
    assert text.host_optimizer.kind == "adamw" and text.host_optimizer.betas == (0.9, 0.95)
    assert (text.lr_schedule, text.warmup_steps, text.min_lr_ratio, text.grad_clip) == ("cosine", 100, 0.1, 1.0)
    assert get_task("cifar10_impaired").augment and not digits.augment
    assert get_task("synthetic").l_rand == pytest.approx(np.log(4))
    assert text.score(loss=text.l_rand, accuracy=0.3) == pytest.approx(0.0)
    assert digits.score(loss=9.0, accuracy=0.75) == pytest.approx(75.0)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(DataError, match=r"unknown task 'mnist' \(choose from digits, cifar10, cifar10_impaired, text, synthetic\)"):
        load_task("mnist")


def test_options_that_do_not_apply_are_refused(tmp_path):
    with pytest.raises(DataError, match="takes no data path"):
        load_task("digits", data_path=tmp_path)
    with pytest.raises(DataError, match="takes no context"):
        load_task("synthetic", context=32)


# --- digits and synthetic ---------------------------------------------------------------


def test_digits_splits_are_stratified_and_standardised():
    data = load_task("digits")
    assert (len(data.train), len(data.val), len(data.test)) == (1257, 270, 270)
    assert data.train.inputs.shape == (1257, 1, 8, 8) and data.train.inputs.dtype == torch.float32
    assert data.train.inputs.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert data.train.inputs.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    for split in (data.val, data.test):  # stratified: every class near its overall share of ~10 %
        assert torch.bincount(split.labels, minlength=10).min() >= 25
    assert len(data.data_digest) == 64 and load_task("digits").data_digest == data.data_digest


def test_synthetic_is_generated_deterministically():
    data = load_task("synthetic")
    assert (len(data.train), len(data.val), len(data.test)) == (1024, 256, 256)
    assert data.train.inputs.shape == (1024, 1, 8, 8)
    assert torch.bincount(data.train.labels).tolist() == [256] * 4
    assert data.data_digest is None
    assert torch.equal(load_task("synthetic").test.inputs, data.test.inputs)


# --- CNN batching -----------------------------------------------------------------------


def _numbered(n: int) -> TaskData:
    """Synthetic task data whose training labels are the sample indices."""
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return attrs.evolve(load_task("synthetic"), train=Split(inputs, torch.arange(n)))


def _seen(batches) -> list[int]:
    return [i for _, labels in batches for i in labels.tolist()]


def test_train_batches_visit_every_sample_once_per_epoch():
    data, generator = _numbered(1000), torch.Generator().manual_seed(3)
    first = list(train_batches(data, generator, "cpu"))
    assert [len(y) for _, y in first] == [64] * 15 + [40]
    assert sorted(_seen(first)) == list(range(1000))
    second = _seen(train_batches(data, generator, "cpu"))
    assert sorted(second) == list(range(1000)) and second != _seen(first)


def test_a_final_single_sample_batch_is_dropped():
    batches = list(train_batches(_numbered(129), torch.Generator().manual_seed(0), "cpu"))
    assert [len(y) for _, y in batches] == [64, 64]
    assert len(set(_seen(batches))) == 128


def test_same_seed_gives_same_batches_without_touching_the_global_generator():
    data = load_task("digits")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    runs = [list(train_batches(data, torch.Generator().manual_seed(7), "cpu")) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    for (xa, ya), (xb, yb) in zip(*runs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = _seen(train_batches(data, torch.Generator().manual_seed(8), "cpu"))
    assert other != _seen(runs[0])


def test_eval_batches_cover_the_split_in_order_with_the_tail():
    data = load_task("digits")
    batches = list(eval_batches(data, "val", "cpu"))
    assert [len(y) for _, y in batches] == [64] * 4 + [14]
    assert torch.equal(torch.cat([x for x, _ in batches]), data.val.inputs)
    assert torch.equal(torch.cat([y for _, y in batches]), data.val.labels)
    with pytest.raises(ValueError):
        eval_batches(data, "train", "cpu")


# --- CIFAR-10 ---------------------------------------------------------------------------

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 strings, as in the real CIFAR-10 files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def _cifar_pickle(data, labels) -> bytes:
    """A batch file in the real files' format: a Python 2 protocol-2 pickle naming numpy.core."""
    batch = {"batch_label": "fake", "data": data, "labels": labels, "filenames": ["x.png"] * len(labels)}
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(batch)
    return out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


BASE = np.random.default_rng(0).integers(0, 256, (10_000, 3072), dtype=np.uint8)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A fake CIFAR-10 download: file k has labels all k % 10 and first pixel k."""
    root = tmp_path_factory.mktemp("cifar")
    batches = root / "cifar-10-batches-py"
    batches.mkdir()
    for k, name in enumerate(CIFAR_FILES):
        data = BASE.copy()
        data[:, 0] = k
        (batches / name).write_bytes(_cifar_pickle(data, [k % 10] * 10_000))
    return root


@pytest.fixture(scope="module")
def cifar_data(cifar_dir):
    return load_task("cifar10", data_path=cifar_dir)


def test_cifar_loads_with_the_right_splits(cifar_data):
    data = cifar_data
    assert (len(data.train), len(data.val), len(data.test)) == (45_000, 5_000, 10_000)
    assert data.train.inputs.dtype == torch.uint8 and data.train.inputs.shape[1:] == (3, 32, 32)
    assert torch.bincount(data.train.labels).tolist() == [10_000] * 4 + [5_000]
    assert set(data.val.inputs[:, 0, 0, 0].tolist()) == {4}  # the last 5,000 of data_batch_5
    assert set(data.test.inputs[:, 0, 0, 0].tolist()) == {5}
    expected = BASE[1].copy()
    expected[0] = 0
    assert torch.equal(data.train.inputs[1].flatten(), torch.from_numpy(expected))  # channel planes


def test_cifar_reads_the_batches_directory_itself_and_digests_its_files(cifar_dir, cifar_data):
    files = cifar_dir / "cifar-10-batches-py"
    digest = hashlib.sha256(b"".join((files / name).read_bytes() for name in CIFAR_FILES)).hexdigest()
    assert cifar_data.data_digest == digest
    assert load_task("cifar10_impaired", data_path=files).data_digest == digest


def test_cifar_batches_are_normalised_and_augmented(cifar_data):
    data = cifar_data
    x, y = next(eval_batches(data, "test", "cpu"))
    assert x.dtype == torch.float32 and x.shape == (128, 3, 32, 32) and y.tolist() == [5] * 128
    assert torch.allclose(x, cifar.normalise(data.test.inputs[:128]))
    batches = train_batches(data, torch.Generator().manual_seed(0), "cpu")
    assert sum(len(y) for _, y in batches) == 45_000
    x, _ = next(train_batches(data, torch.Generator().manual_seed(0), "cpu"))
    assert x.shape == (128, 3, 32, 32) and x.is_contiguous()


def test_augmentation_is_a_crop_of_the_zero_padded_image_and_maybe_a_flip():
    images = torch.randn(16, 3, 32, 32)
    out = cifar.augment(images, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    shifts = []
    for image, result in zip(padded, out, strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(result, (image.flip(2) if flip else image)[:, dy : dy + 32, dx : dx + 32])
        ]
        assert matches
        shifts.append(matches[0])
    assert len(set(shifts)) > 1 and {flip for *_, flip in shifts} == {False, True}
    assert torch.equal(out, cifar.augment(images, torch.Generator().manual_seed(1)))


def _broken_dir(tmp_path, cifar_dir, name: str, raw: bytes | None):
    """A CIFAR directory linking the good files, with ``name`` replaced by ``raw`` (None: missing)."""
    for other in CIFAR_FILES:
        if other != name:
            (tmp_path / other).symlink_to(cifar_dir / "cifar-10-batches-py" / other)
    if raw is not None:
        (tmp_path / name).write_bytes(raw)
    return tmp_path


class _Ordered(collections.OrderedDict):
    pass


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _labels(*values):
    return list(values) + [0] * (10_000 - len(values))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _cifar_pickle(BASE[:9999], _labels()), r"'data' has shape \(9999, 3072\)$"),
        (lambda: _cifar_pickle(BASE.astype(np.int16), _labels()), "'data' has dtype int16, not uint8"),
        (lambda: _cifar_pickle(BASE, _labels(3, 10)), "'labels' holds 10, outside 0-9"),
        (lambda: _cifar_pickle(BASE, _labels(-1)), "'labels' holds -1, outside 0-9"),
        (lambda: _cifar_pickle(BASE, _labels()[:-1]), "'labels' has 9999 entries, not 10000"),
        (lambda: _cifar_pickle(BASE, _labels(0.5)), "'labels' is not a list of integers"),
        (lambda: pickle.dumps({b"labels": _labels()}), "it has no 'data'"),
        (lambda: pickle.dumps([1, 2]), "it holds a list, not a dict"),
        (lambda: pickle.dumps(_Ordered(data=BASE, labels=_labels())), r"test_tasks\._Ordered, which a data file"),
        (lambda: pickle.dumps(collections.OrderedDict(data=1)), "collections.OrderedDict, which a data file"),
        (lambda: b"not a pickle at all", "unreadable pickle"),
    ],
    ids=["shape", "dtype", "label-10", "label-negative", "label-count", "label-float", "no-data", "list",
         "dict-subclass", "ordered-dict", "garbage"],
)
def test_cifar_format_defects_name_the_file_and_the_defect(tmp_path, cifar_dir, build, message):
    directory = _broken_dir(tmp_path, cifar_dir, "data_batch_3", build())
    with pytest.raises(DataError, match=message) as caught:
        load_task("cifar10", data_path=directory)
    assert str(caught.value).startswith(f"'{directory}/data_batch_3' is not a CIFAR-10 batch: ")
    assert "\n" not in str(caught.value)


def test_a_foreign_callable_is_refused_without_running_it(tmp_path, cifar_dir):
    marker = tmp_path / "ran"
    (tmp_path / "data").mkdir()
    directory = _broken_dir(tmp_path / "data", cifar_dir, "data_batch_1", pickle.dumps(_RunsCommand(marker), protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1' is not a CIFAR-10 batch: it refers to \w+\.system"):
        load_task("cifar10", data_path=directory)
    assert not marker.exists()


def test_missing_cifar_data_is_a_one_line_error(tmp_path, cifar_dir):
    hint = r"\(pass --data with the python-pickle batches directory\)$"
    with pytest.raises(DataError, match=f"does not exist {hint}"):
        load_task("cifar10", data_path=tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"CIFAR-10 data not found: '{re.escape(str(tmp_path))}' has no data_batch_1 {hint}"):
        load_task("cifar10", data_path=tmp_path)
    with pytest.raises(DataError, match="CIFAR-10 data not given"):
        load_task("cifar10")
    (tmp_path / "partial").mkdir()
    directory = _broken_dir(tmp_path / "partial", cifar_dir, "data_batch_4", None)
    with pytest.raises(DataError, match=f"'{re.escape(str(directory))}' has no data_batch_4 {hint}"):
        load_task("cifar10", data_path=directory)


# --- text -------------------------------------------------------------------------------


def _text_file(tmp_path, n: int):
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)))
    return path


def test_text_splits_are_contiguous_and_capped(tmp_path):
    path = _text_file(tmp_path, 10_000)
    data = load_task("text", data_path=path, context=8)
    corpus = path.read_bytes()
    assert (len(data.train), len(data.val), len(data.test)) == (9_000, 500, 500)
    assert bytes(data.val.inputs.tolist()) == corpus[9_000:9_500]
    assert data.context == 8 and data.data_digest == hashlib.sha256(corpus).hexdigest()

    big = load_task("text", data_path=_text_file(tmp_path, 4_000_000))
    assert (len(big.train), len(big.val), len(big.test)) == (3_600_000, 131_072, 131_072)
    assert big.context == 64


def test_too_small_text_is_a_one_line_error(tmp_path):
    # 10 × (8 + 1) = 90 bytes per split; 5 % of 1,700 bytes is 85.
    with pytest.raises(DataError, match="text data too small: .* validation split of 85 bytes.* at least 90"):
        load_task("text", data_path=_text_file(tmp_path, 1_700), context=8)
    with pytest.raises(DataError, match="does not exist"):
        load_task("text", data_path=tmp_path / "missing.txt")


def test_text_train_batches_are_random_windows_with_shifted_targets(tmp_path):
    data = load_task("text", data_path=_text_file(tmp_path, 10_000), context=8)
    stream = bytes(data.train.inputs.tolist())
    batches = list(train_batches(data, torch.Generator().manual_seed(0), "cpu"))
    assert len(batches) == 200
    x, y = batches[0]
    assert x.shape == y.shape == (32, 8) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        assert row_x[1:] == row_y[:-1] and bytes(row_x + row_y[-1:]) in stream
    again = next(train_batches(data, torch.Generator().manual_seed(0), "cpu"))
    assert torch.equal(again[0], x)


def test_text_eval_windows_include_the_final_short_window(tmp_path):
    data = load_task("text", data_path=_text_file(tmp_path, 10_000), context=8)
    batches = list(eval_batches(data, "val", "cpu"))  # 499 predicted tokens: 62 windows of 8, then 3
    assert [tuple(x.shape) for x, _ in batches] == [(32, 8), (30, 8), (1, 3)]
    stream = data.val.inputs.long()
    assert torch.equal(torch.cat([x.flatten() for x, _ in batches]), stream[:-1])
    assert torch.equal(torch.cat([y.flatten() for _, y in batches]), stream[1:])


def test_the_default_corpus_is_the_standard_library_source():
    start = time.perf_counter()
    data = load_task("text")
    assert time.perf_counter() - start < 5
    assert len(data.train) > 1_000_000 and len(data.val) == len(data.test) == 131_072
    assert len(data.data_digest) == 64
    assert b"def " in bytes(data.val.inputs[:20_000].tolist())
