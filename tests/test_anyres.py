"""ivtp/anyres.py: LLaVA-NeXT's geometry against transformers' own processor and packing, and the pruned order on a
hand-worked grid."""

import pytest
import torch
from PIL import Image

from ivtp import anyres
from ivtp.models import tiny_random_next

SIZES = [(150, 100), (112, 112), (90, 260), (300, 60), (60, 300), (224, 224), (113, 111)]  # (width, height)


@pytest.fixture(scope="module")
def next_model():
    return tiny_random_next(image_size=112)  # 8 x 8 patches per crop; grids 1x2, 2x1, 2x2, 3x1, 1x3


@pytest.mark.parametrize("size", SIZES)
def test_stock_tokens_and_crops_are_the_processors(next_model, size):
    model, processor = next_model
    batch = processor(images=[Image.new("RGB", size)], text=["<image>"], return_tensors="pt")
    image_size = batch["image_sizes"][0]
    assert anyres.stock_tokens(image_size, model.config) == int((batch["input_ids"] == model.config.image_token_id).sum())
    assert anyres.crop_counts(batch["image_sizes"], model.config) == [batch["pixel_values"].shape[1]]  # one image


def test_raster_order_on_a_hand_worked_grid():
    # Two tiles side by side (grid 1 x 2), 2 x 2 patches each: the map's row 0 is tile 0's patches 0, 1 then tile
    # 1's 0, 1; row 1 is tile 0's 2, 3 then tile 1's 2, 3. The base view keeps patches 1, 2; tile 0 keeps 0, 3 and
    # tile 1 keeps 1, 2. Flattened crop after crop: base 0-1, tile 0 at 2-3, tile 1 at 4-5. In the map: tile 0's
    # patch 0 (row 0, col 0), tile 1's patch 1 (row 0, col 3), tile 0's patch 3 (row 1, col 1), tile 1's 2 (row 1,
    # col 2).
    kept = torch.tensor([[1, 2], [0, 3], [1, 2]])
    assert anyres.raster_order(kept, (1, 2), 2).tolist() == [0, 1, 2, 4, 3, 5]
    # Stacked tiles (grid 2 x 1): every row of tile 0 comes before tile 1's.
    assert anyres.raster_order(kept, (2, 1), 2).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="3 crops for a 2 x 2 grid"):
        anyres.raster_order(kept, (2, 2), 2)
    # A token that stands for no patch (-1: EViT's fused token, a merged one) follows every placed one, tile after
    # tile; the base view's tokens stay as they come.
    places = torch.tensor([[1, -1, 2], [-1, 0, 3], [1, 2, -1]])
    # flattened: base 0-2; tile 0 at 3-5 (3: none, 4: patch 0, 5: patch 3); tile 1 at 6-8 (6: patch 1, 7: 2, 8: none)
    assert anyres.raster_order(places, (1, 2), 2).tolist() == [0, 1, 2, 4, 6, 5, 7, 3, 8]


@pytest.mark.parametrize("grid_size", [(224, 112), (112, 224), (224, 224), (336, 112)])  # (width, height)
def test_keeping_every_patch_reads_the_tiles_as_the_stock_map_does(next_model, grid_size):
    """With every patch kept and nothing to cut (the image fills its grid), the pruned order is transformers' own
    pack_image_features without its newlines."""
    model, _ = next_model
    config = model.config
    image_size = torch.tensor([grid_size[1], grid_size[0]])
    crops, n = anyres.crop_count(image_size, config), anyres.side(config)
    features = torch.randn(crops, n * n, 5)
    stock, _ = model.model.pack_image_features([features], image_size[None], "default", image_newline=None)
    kept = torch.arange(n * n).expand(crops, -1)
    order = anyres.raster_order(kept, anyres.tile_grid(image_size, config), n)
    assert torch.equal(features.flatten(0, 1)[order], stock[0])


def test_layout_counts(next_model):
    model, _ = next_model
    sizes = torch.tensor([[100, 150], [260, 90]])  # (height, width)
    full, kept = anyres.AnyResLayout(model.config, 16, stock=False).counts(2, sizes)
    assert kept.tolist() == [16 * anyres.crop_count(s, model.config) for s in sizes]
    assert full.tolist() == [anyres.stock_tokens(s, model.config) for s in sizes]
    assert torch.equal(anyres.AnyResLayout(model.config, 64, stock=True).counts(2, sizes)[1], full)
    with pytest.raises(ValueError, match="needs image_sizes"):
        anyres.AnyResLayout(model.config, 16, stock=False).counts(2, None)


@pytest.mark.parametrize("size", SIZES)
def test_stock_places_are_where_transformers_packs_each_patch(next_model, size):
    """Features that carry their own crop-major index, packed by transformers' pack_image_features (padding cut,
    image_newline after each row): the packed sequence reads stock_places, -1 at the newlines."""
    model, _ = next_model
    config = model.config
    image_size = [size[1], size[0]]
    crops, n = anyres.crop_count(image_size, config), anyres.side(config)
    features = torch.arange(crops * n * n, dtype=torch.float).view(crops, n * n, 1)
    packed, _ = model.model.pack_image_features([features], torch.tensor([image_size]), "default",
                                                image_newline=torch.tensor([-1.0]))
    assert torch.equal(packed[0][:, 0].long(), anyres.stock_places(image_size, config))


def test_places_of_the_raster_order_name_each_handed_on_tokens_patch():
    # The hand-worked grid of test_raster_order_on_a_hand_worked_grid, with 2 x 2 patches per crop (4 per crop):
    # base keeps 1, 2 (crop-major 1, 2); tile 0 keeps 0, 3 (4, 7); tile 1 keeps 1, 2 (9, 10); in the map's order
    # tile 0's 0, tile 1's 1, tile 0's 3, tile 1's 2.
    config = tiny_random_next(image_size=28)[0].config  # 2 x 2 patches per crop, the 1 x 2 grid at 28 x 56 px
    def handed_on(places):
        order = anyres.raster_order(places, anyres.tile_grid((28, 56), config), anyres.side(config))
        return anyres.places_of(places, order, config).tolist()

    assert handed_on(torch.tensor([[1, 2], [0, 3], [1, 2]])) == [1, 2, 4, 9, 7, 10]
    assert handed_on(torch.tensor([[1, -1], [0, 3], [-1, 2]])) == [1, -1, 4, 7, 10, -1]
