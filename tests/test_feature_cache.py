"""recipes.common.feature_cache: stored features equal the tower's output, in its dtype; the tower serves them
back."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessor, Blip2VisionConfig, Blip2VisionModel

from recipes.common.feature_cache import VisionFeatureCache, check_frozen, serve_cached_features


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    tower = Blip2VisionModel(Blip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=16)).eval()
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 40), colour).save(paths[-1])
    return tower, processor, paths, tmp_path / "features"


def _live(tower, processor, paths):
    with torch.no_grad():
        pixels = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
        return tower(pixel_values=pixels.to(next(tower.parameters()).dtype)).last_hidden_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_features_are_the_towers_output_looked_up_by_path(setup, dtype):
    tower, processor, paths, root = setup
    tower.to(dtype)
    # duplicates stored once
    cache = VisionFeatureCache.build(tower, processor, paths + paths[:1], root, batch_size=2)
    assert len(cache) == 3 and cache.dtype == dtype
    got = cache.get([paths[2], paths[0], paths[2]])
    assert got.shape == (3, 5, 16) and got.dtype == dtype  # 2 x 2 patches + class token
    assert torch.equal(got, _live(tower, processor, [paths[2], paths[0], paths[2]]))
    # A DataLoader worker gets the folder, not the mapped array, and reads the same values.
    again = pickle.loads(pickle.dumps(cache))
    assert again._array is None and torch.equal(again.get(paths[:1]), got[1:2])
    with pytest.raises(KeyError, match="not in the vision feature cache"):
        cache.get(["elsewhere.png"])


def test_the_same_inputs_reuse_the_folder_and_other_weights_make_a_new_one(setup):
    tower, processor, paths, root = setup
    first = VisionFeatureCache.build(tower, processor, paths, root)
    assert VisionFeatureCache.build(tower, processor, list(reversed(paths)), root).folder == first.folder
    with torch.no_grad():
        tower.post_layernorm.bias.add_(1.0)
    second = VisionFeatureCache.build(tower, processor, paths, root)
    assert second.folder != first.folder and torch.equal(second.get(paths), _live(tower, processor, paths))
    assert not torch.equal(second.get(paths), first.get(paths))


def test_another_processor_class_or_a_replaced_image_makes_a_new_folder(setup):
    tower, processor, paths, root = setup
    first = VisionFeatureCache.build(tower, processor, paths, root)

    class OtherBackend(type(processor)):  # e.g. the torchvision and PIL backends: one dict, other pixels
        def to_dict(self):
            return processor.to_dict()

    other = OtherBackend(size={"height": 32, "width": 32})
    assert other.to_dict() == processor.to_dict()
    assert VisionFeatureCache.build(tower, other, paths, root).folder != first.folder
    # An image replaced by another of its size and modification time (an archive unpacked over the old one)
    bmps = [str(Path(paths[0]).with_suffix(f".{i}.bmp")) for i in range(2)]
    for path, colour in zip(bmps, ["red", "green"]):
        Image.new("RGB", (40, 40), colour).save(path)
    before = VisionFeatureCache.build(tower, processor, bmps, root)
    stat = os.stat(bmps[0])
    Image.new("RGB", (40, 40), "blue").save(bmps[0])
    os.utime(bmps[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(bmps[0]).st_size == stat.st_size and os.stat(bmps[0]).st_mtime_ns == stat.st_mtime_ns
    after = VisionFeatureCache.build(tower, processor, bmps, root)
    assert after.folder != before.folder and torch.equal(after.get(bmps), _live(tower, processor, bmps))


def test_a_serving_tower_passes_features_through_and_still_runs_on_pixels(setup):
    tower, processor, paths, _ = setup
    live = _live(tower, processor, paths)
    serve_cached_features(tower)
    serve_cached_features(tower)  # twice is once
    features = torch.randn(3, 5, 16)
    assert tower(pixel_values=features).last_hidden_state is features
    assert torch.equal(_live(tower, processor, paths), live)
    assert set(tower.state_dict()) == set(Blip2VisionModel(tower.config).state_dict())


def test_a_tower_that_trains_cannot_be_cached(setup):
    tower, *_ = setup
    check_frozen(tower.requires_grad_(False))
    tower.encoder.layers[0].mlp.fc1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="512 parameters of the vision tower train"):
        check_frozen(tower)
