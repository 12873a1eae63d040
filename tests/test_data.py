"""Datasets, subsets, augmentation and loaders of ``relkd.data``."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import relkd.data as data
import relkd.data.fashion_mnist as fashion_module
from relkd.data.augment import AugmentSpec, augment_batch, crop, hflip, normalize
from relkd.data.seeding import derive_seed
from relkd.data.subset import class_quotas

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """Tests must not depend on the data variables of whoever runs them."""
    for var in (
        "RELKD_DATA",
        "RELKD_FASHION_MNIST",
        "RELKD_CIFAR10",
        "RELKD_CIFAR100",
        "RELKD_IMAGEFOLDER",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def digits() -> data.DataBundle:
    return data.build("digits")


def _batches(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(batch) for batch in loader]


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


# -- registry and build ---------------------------------------------------------------------------


def test_registry_lists_every_dataset():
    assert {"digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder"} <= set(data.available())


def test_unknown_dataset_suggests_close_name():
    with pytest.raises(KeyError, match="cifar10"):
        data.build("cifar01")


def test_unknown_option_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(TypeError, match="'image_sise'.*'image_size'"):
        data.build("imagefolder", root=tmp_path, image_sise=8)
    with pytest.raises(TypeError, match="'foo'.*no extra options"):
        data.build("digits", foo=1)


def test_unlabeled_without_subset_is_an_error():
    with pytest.raises(ValueError, match="train_subset"):
        data.build("digits", unlabeled=True)


# -- digits ---------------------------------------------------------------------------------------


def test_digits_shapes_and_split_sizes(digits):
    assert (len(digits.train), len(digits.test)) == (1347, 450)
    assert digits.num_train == 1347 and digits.train_targets.shape == (1347,)
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, (8, 8))
    item = digits.train[5]
    assert item["input"].shape == (1, 8, 8) and item["input"].dtype == torch.float32
    assert item["target"].dtype == torch.int64 and int(item["index"]) == 5
    assert digits.transfer is None


def test_digits_split_is_stratified_and_covers_all_images(digits):
    from sklearn.datasets import load_digits

    full = torch.from_numpy(load_digits().target).bincount()
    test = digits.test.targets.bincount()
    assert torch.equal(digits.train_targets.bincount() + test, full)
    # stratified: each class's share of the test set is its share of the data, up to rounding
    assert (test.double() - full.double() * 450 / 1797).abs().max() < 1


def test_digits_split_ignores_run_seed_and_normalises_train_to_unit_stats(digits):
    other = data.build("digits", seed=7)
    assert torch.equal(other.test.images, digits.test.images)
    assert torch.equal(other.train.images, digits.train.images)
    x = torch.stack([digits.train[i]["input"] for i in range(len(digits.train))])
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_digits_pixels_round_trip(digits):
    item = digits.train[10]
    raw = item["input"] * digits.std[0] + digits.mean[0]
    torch.testing.assert_close(raw, digits.train.images[10].float() / 16)


# -- class-balanced subsets -----------------------------------------------------------------------


def test_class_quotas_hand_cases():
    assert class_quotas(torch.tensor([3, 3, 3]), 7).tolist() == [3, 2, 2]
    # class 1 has one image; its shortfall of 2 goes one each to classes 0 and 2
    assert class_quotas(torch.tensor([5, 1, 10]), 9).tolist() == [4, 1, 4]


@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    frac=st.floats(0, 1),
)
def test_class_quotas_are_exact_feasible_and_balanced(counts, frac):
    counts_t = torch.tensor(counts)
    n = int(frac * sum(counts))
    quota = class_quotas(counts_t, n)
    assert int(quota.sum()) == n
    assert bool((quota <= counts_t).all()) and bool((quota >= 0).all())
    # a class that could give more is never two behind any other class
    unsaturated = quota < counts_t
    if unsaturated.any():
        assert int(quota[unsaturated].min()) >= int(quota.max()) - 1


def test_subset_is_balanced_deterministic_and_disjoint_from_transfer(digits):
    bundle = data.build("digits", train_subset=105, unlabeled=True, seed=3)
    # 105 = 10 * 10 + 5: ten of every class, one more for labels 0..4
    assert bundle.train.targets.bincount().tolist() == [11] * 5 + [10] * 5
    assert len(bundle.transfer) == 1347 - 105
    assert bool((bundle.transfer.targets == -1).all())
    both = torch.cat([bundle.train.indices, bundle.transfer.indices])
    assert torch.equal(both.sort().values, torch.arange(1347))
    again = data.build("digits", train_subset=105, unlabeled=True, seed=3)
    assert torch.equal(again.train.indices, bundle.train.indices)
    other = data.build("digits", train_subset=105, seed=4)
    assert not torch.equal(other.train.indices, bundle.train.indices)
    assert other.transfer is None


def test_subset_keeps_full_training_set_indices(digits):
    bundle = data.build("digits", train_subset=50, unlabeled=True, seed=0)
    assert bundle.num_train == 1347 and torch.equal(bundle.train_targets, digits.train_targets)
    for ds in (bundle.train, bundle.transfer):
        for i in (0, len(ds) // 2, len(ds) - 1):
            item = ds[i]
            full = digits.train[int(item["index"])]
            assert torch.equal(item["input"], full["input"])
    assert torch.equal(digits.train_targets[bundle.train.indices], bundle.train.targets)


def test_subset_size_is_checked(digits):
    with pytest.raises(ValueError, match="larger than the training set"):
        data.build("digits", train_subset=1348)
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        data.build("digits", train_subset=9)
    whole = data.build("digits", train_subset=1347, unlabeled=True)
    assert len(whole.train) == 1347 and whole.transfer is None


# -- augmentation ---------------------------------------------------------------------------------


def test_hflip_mirrors_only_masked_images():
    x = torch.arange(24.0).view(2, 1, 3, 4)
    out = hflip(x, torch.tensor([True, False]))
    assert out[0, 0].tolist() == [[3, 2, 1, 0], [7, 6, 5, 4], [11, 10, 9, 8]]
    assert torch.equal(out[1], x[1])


def test_crop_with_zero_padding_at_known_offsets():
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]).expand(3, 1, 3, 3)
    out = crop(x, 1, top=torch.tensor([0, 2, 1]), left=torch.tensor([0, 2, 1]))
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    assert out[1, 0].tolist() == [[5, 6, 0], [8, 9, 0], [0, 0, 0]]
    assert torch.equal(out[2], x[2])


def test_augment_batch_yields_flipped_windows_of_the_padded_image():
    x = torch.rand(16, 3, 6, 5)
    out = augment_batch(x, AugmentSpec(padding=2, flip=True), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(16):
        windows = [padded[b, :, t : t + 6, s : s + 5] for t in range(5) for s in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(-1)) for w in windows)


def test_augment_spec_and_normalize():
    with pytest.raises(ValueError, match="padding"):
        AugmentSpec(padding=-1)
    x = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1)
    assert normalize(x, (0.5, 0.5), (0.25, 0.5)).flatten().tolist() == [0.0, 1.0]


def test_derive_seed_separates_epochs_and_streams():
    seeds = {derive_seed(0, e, s) for e in range(20) for s in (0, 1)}
    assert len(seeds) == 40 and derive_seed(0, 3, 1) == derive_seed(0, 3, 1)
    with pytest.raises(ValueError):
        derive_seed(-1)


# -- TensorDataLoader -----------------------------------------------------------------------------


def test_loader_length_and_unshuffled_order(digits):
    loader = data.make_loader(digits.test, 100, shuffle=False, seed=0)
    assert isinstance(loader, data.TensorDataLoader) and len(loader) == 5
    batches = _batches(loader)
    assert [len(b["index"]) for b in batches] == [100] * 4 + [50]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(450))
    torch.testing.assert_close(batches[1]["input"][3], digits.test[103]["input"])
    assert len(data.make_loader(digits.test, 100, False, 0, drop_last=True)) == 4


def test_loader_shuffle_is_seeded_and_changes_with_epoch(digits):
    def epoch(e, seed=0):
        loader = data.make_loader(digits.train, 128, shuffle=True, seed=seed)
        loader.set_epoch(e)
        return _batches(loader)

    e0, e1 = epoch(0), epoch(1)
    order = torch.cat([b["index"] for b in e0])
    assert torch.equal(order.sort().values, torch.arange(1347))
    assert not torch.equal(order, torch.arange(1347))
    assert _same_batches(e0, epoch(0)) and _same_batches(e1, epoch(1))
    assert not torch.equal(e0[0]["index"], e1[0]["index"])
    assert not torch.equal(e0[0]["index"], epoch(0, seed=1)[0]["index"])


def test_loader_resumed_at_an_epoch_matches_an_uninterrupted_run():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    ds = data.InMemoryDataset(
        images,
        torch.arange(40) % 4,
        max_value=255,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        augment_spec=AugmentSpec(padding=2, flip=True),
        augment=True,
    )
    uninterrupted = data.make_loader(ds, 16, shuffle=True, seed=5)
    epochs = [_batches(uninterrupted) for _ in range(3)]
    resumed = data.make_loader(ds, 16, shuffle=True, seed=5)
    resumed.set_epoch(2)
    assert _same_batches(_batches(resumed), epochs[2])
    assert not _same_batches(epochs[1], epochs[2])
    # augmentation really happened: inputs differ from the unaugmented items
    first = epochs[0][0]
    plain = torch.stack([ds[int(i)]["input"] for i in first["index"]])
    assert first["input"].shape == plain.shape and not torch.equal(first["input"], plain)
    off = data.make_loader(ds, 16, shuffle=True, seed=5, augment=False)
    batch = next(iter(off))
    plain = torch.stack([ds[int(i)]["input"] for i in batch["index"]])
    torch.testing.assert_close(batch["input"], plain)


def test_loader_works_with_the_default_collate(digits):
    batch = torch.utils.data.default_collate([digits.train[i] for i in range(4)])
    assert batch["input"].shape == (4, 1, 8, 8) and batch["index"].tolist() == [0, 1, 2, 3]


# -- Fashion-MNIST --------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_parses_plain_and_gzipped_files(tmp_path):
    expected = np.arange(24).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        _write_idx(tmp_path / name, expected)
        np.testing.assert_array_equal(fashion_module.read_idx(tmp_path / name), expected)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        fashion_module.read_idx(tmp_path / "bad")


def test_fashion_mnist_from_a_torchvision_style_folder(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    bundle = data.build("fashion_mnist", root=tmp_path)
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(train_x.astype(np.uint8)))
    assert bundle.test.targets.tolist() == [0, 1, 2, 3, 4]
    assert bundle.train.augment_spec == AugmentSpec(padding=2, flip=True)


def test_fashion_mnist_missing_lists_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_module, "SYSTEM_DIRS", [str(tmp_path / "system")])
    monkeypatch.setenv("RELKD_FASHION_MNIST", str(tmp_path / "env"))
    monkeypatch.setenv("RELKD_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as err:
        data.build("fashion_mnist", root=tmp_path / "arg")
    message = str(err.value)
    for place in ("arg", "env", "data/fashion_mnist", "system"):
        assert str(tmp_path / place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "RELKD_FASHION_MNIST" in message


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed in /usr/share/datasets/fashion-mnist "
    "(apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_system_copy():
    bundle = data.build("fashion_mnist")
    assert (bundle.num_train, len(bundle.test)) == (60000, 10000)
    assert bundle.train.images.shape == (60000, 1, 28, 28)
    assert bundle.train.images.dtype == torch.uint8
    assert bundle.train_targets.bincount().tolist() == [6000] * 10
    assert bundle.test.targets.bincount().tolist() == [1000] * 10


# -- CIFAR ----------------------------------------------------------------------------------------


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar_roots(tmp_path) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """Tiny CIFAR-10 / CIFAR-100 trees in the official python layout, 20 images per file."""
    rng = np.random.default_rng(0)
    out = {}
    c10 = tmp_path / "c10" / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    rows, labels = rng.integers(0, 256, (120, 3072), dtype=np.uint8), rng.integers(0, 10, 120)
    for k in range(6):
        name = f"data_batch_{k + 1}" if k < 5 else "test_batch"
        part = slice(20 * k, 20 * (k + 1))
        _dump(c10 / name, {b"data": rows[part], b"labels": labels[part].tolist()})
    _dump(c10 / "batches.meta", {b"label_names": [f"c{k}".encode() for k in range(10)]})
    out["cifar10"] = (c10, rows, labels)

    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    rows, fine = rng.integers(0, 256, (40, 3072), dtype=np.uint8), rng.integers(0, 100, 40)
    for name, part in (("train", slice(0, 20)), ("test", slice(20, 40))):
        batch = {b"data": rows[part], b"fine_labels": fine[part].tolist()}
        batch[b"coarse_labels"] = (fine[part] // 5).tolist()
        _dump(c100 / name, batch)
    _dump(c100 / "meta", {b"fine_label_names": [f"f{k}".encode() for k in range(100)]})
    out["cifar100"] = (c100, rows, fine)
    return out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pixels_and_labels_round_trip(cifar_roots, name):
    folder, rows, labels = cifar_roots[name]
    bundle = data.build(name, root=folder.parent)
    n_train = 100 if name == "cifar10" else 20
    assert (len(bundle.train), len(bundle.test)) == (n_train, 20)
    # official layout: 1024 red, then green, then blue values, each a row-major 32x32 plane
    r, c, h, w = 7, 2, 5, 30
    assert int(bundle.train.images[r, c, h, w]) == rows[r, 1024 * c + 32 * h + w]
    assert int(bundle.test.images[3, 1, 0, 0]) == rows[n_train + 3, 1024]
    assert bundle.train_targets.tolist() == labels[:n_train].tolist()
    assert bundle.test.targets.tolist() == labels[n_train:].tolist()
    item = bundle.train[r]
    std, mean = torch.tensor(bundle.std).view(3, 1, 1), torch.tensor(bundle.mean).view(3, 1, 1)
    expected = torch.from_numpy(rows[r].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(item["input"] * std + mean, expected)
    assert bundle.num_classes == (10 if name == "cifar10" else 100)
    assert bundle.train.augment_spec == AugmentSpec(padding=4, flip=True)


def test_cifar_root_may_be_the_batches_folder_or_come_from_env(cifar_roots, monkeypatch):
    folder, rows, _ = cifar_roots["cifar10"]
    direct = data.build("cifar10", root=folder)
    assert direct.classes[:2] == ("c0", "c1") and direct.num_train == 100
    monkeypatch.setenv("RELKD_CIFAR100", str(cifar_roots["cifar100"][0]))
    assert data.build("cifar100").num_train == 20


def test_cifar_missing_names_the_paths_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("RELKD_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as err:
        data.build("cifar100", root=tmp_path / "arg")
    message = str(err.value)
    for place in ("arg/cifar-100-python", "arg", "data/cifar-100-python"):
        assert str(tmp_path / place) in message
    assert "python version" in message and "RELKD_CIFAR100" in message


# -- imagefolder ----------------------------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{k}.png")
    return tmp_path


def test_imagefolder_items_and_metadata(image_root):
    bundle = data.build("imagefolder", root=image_root, image_size=8)
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (6, 2, 2)
    assert bundle.classes == ("cat", "dog") and bundle.image_size == (8, 8)
    assert bundle.train_targets.tolist() == [0, 0, 0, 1, 1, 1]
    item = bundle.test[1]
    assert item["input"].shape == (3, 8, 8) and item["input"].dtype == torch.float32
    assert int(item["target"]) == 1 and int(item["index"]) == 1
    assert torch.equal(bundle.test[1]["input"], item["input"])


def test_imagefolder_grey_channels_and_normalisation_from_the_data(image_root):
    from PIL import Image

    bundle = data.build("imagefolder", root=image_root, channels=1)
    assert bundle.in_channels == 1 and bundle.image_size == (12, 12)  # the first image's larger side
    # the constants are the mean and std of the grey training pixels (PIL's "L"), resized to 12 x 12
    pixels = []
    for cls in ("cat", "dog"):
        for k in range(3):
            grey = (
                Image.open(image_root / "train" / cls / f"{k}.png")
                .convert("L")
                .resize((12, 12), Image.BILINEAR)
            )
            pixels.append(np.asarray(grey, dtype=np.float64) / 255.0)
    pixels = np.stack(pixels)
    assert bundle.mean == pytest.approx((pixels.mean(),), rel=1e-6)  # ToTensor gives float32
    assert bundle.std == pytest.approx((pixels.std(),), rel=1e-6)
    item = bundle.train.with_augment(False)[0]["input"]
    assert item.shape == (1, 12, 12)
    expected = (pixels[0] - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(item[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_imagefolder_augmentation_options(image_root):
    plain = data.build("imagefolder", root=image_root, image_size=8)
    first = plain.train[0]["input"]
    assert torch.equal(first, plain.train.with_augment(False)[0]["input"])  # none: training = evaluation
    imagenet = data.build(
        "imagefolder", root=image_root, image_size=8, augmentation="imagenet", normalize="imagenet"
    )
    assert imagenet.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="augmentation must be one of none, crop, crop_flip, imagenet"):
        data.build("imagefolder", root=image_root, augmentation="random")
    with pytest.raises(ValueError, match="channels must be 1"):
        data.build("imagefolder", root=image_root, channels=2)


def test_imagefolder_loader_augmentation_is_seeded(image_root):
    bundle = data.build("imagefolder", root=image_root, image_size=8, augmentation="crop_flip")

    def run(epoch):
        loader = data.make_loader(bundle.train, 4, shuffle=True, seed=1)
        loader.set_epoch(epoch)
        return _batches(loader)

    first = run(0)
    assert isinstance(data.make_loader(bundle.train, 4, True, 1), data.EpochDataLoader)
    assert [b["input"].shape[0] for b in first] == [4, 2]
    assert _same_batches(first, run(0))
    assert not _same_batches(first, run(1))
    plain = _batches(data.make_loader(bundle.train, 6, False, 1, augment=False))
    assert torch.equal(plain[0]["input"][0], bundle.train.with_augment(False)[0]["input"])


def test_imagefolder_subset_and_transfer(image_root):
    bundle = data.build("imagefolder", root=image_root, image_size=8, train_subset=2, unlabeled=True)
    assert sorted(bundle.train.targets.tolist()) == [0, 1]
    assert len(bundle.transfer) == 4 and int(bundle.transfer[0]["target"]) == -1
    assert set(bundle.train.indices.tolist()).isdisjoint(bundle.transfer.indices.tolist())


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="RELKD_IMAGEFOLDER") as err:
        data.build("imagefolder", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def test_forcing_augmentation_needs_a_relkd_dataset():
    plain = torch.utils.data.TensorDataset(torch.zeros(3))
    with pytest.raises(TypeError, match="with_augment"):
        data.make_loader(plain, 2, False, 0, augment=True)
