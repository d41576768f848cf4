"""LLaVA-NeXT's AnyRes geometry as a pruned model needs it: crops per image, the stock placeholder count, and the
order in which the pruned tokens of an image's crops reach the LLM.

An AnyRes image is a base view (the whole image at the tower's size) and a grid of high-resolution tiles, the grid
transformers' `select_best_resolution` picks for the image's size. Each of them is a crop: one pass of the CLIP
tower, with its own [CLS] and `side x side` patches (24 x 24 for LLaVA-1.6). Stage 1 prunes each crop on its own.

Stock LLaVA-NeXT hands the LLM, per image, the base view's patches, then the tiles' patches as one feature map in
raster order over the whole grid, with the rows of padding (the letterbox the processor added) cut off and an
`image_newline` token after every row. A pruned image (docs/paper.md, "LLaVA-NeXT") keeps that order for its
surviving patches but leaves out both the padding cut and the newlines: its crops' survivors, base view first.
Every image then hands on `per_crop x crops` tokens, a count the host knows from the image sizes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ivtp.errors import InputError

# The image `ivtp flops` and `ivtp bench` price on LLaVA-NeXT when none is given: a square at LLaVA-1.6's largest
# square grid, 2 x 2 tiles and the base view (5 crops, 2,928 stock tokens at 336 px crops).
PRICED_IMAGE_SIZE = (672, 672)


def is_anyres(config_or_processor) -> bool:
    """Whether a model config or image processor is LLaVA-NeXT's (AnyRes crops per image, image_sizes), not
    LLaVA-1.5's one fixed view: both carry the grids."""
    return getattr(config_or_processor, "image_grid_pinpoints", None) is not None


def _size(image_size) -> list[int]:
    """(height, width) as ints, from a tensor row or a sequence (transformers wants a list or tuple)."""
    return [int(x) for x in (image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size)]


def crop_count(image_size, config) -> int:
    """Crops of one image, the base view included: 1 + the tiles of its grid. image_size: (height, width)."""
    return image_size_to_num_patches(_size(image_size), config.image_grid_pinpoints, config.vision_config.image_size)


def crop_counts(image_sizes, config) -> list[int]:
    """Crops per image. image_sizes: (num_images, 2) (height, width) rows."""
    return [crop_count(size, config) for size in image_sizes]


def tile_grid(image_size, config) -> tuple[int, int]:
    """(rows, cols) of one image's high-resolution tiles."""
    return get_anyres_image_grid_shape(_size(image_size), config.image_grid_pinpoints, config.vision_config.image_size)


def side(config) -> int:
    """Patches along one edge of a crop (24 for LLaVA-1.6's CLIP at 336 px)."""
    return config.vision_config.image_size // config.vision_config.patch_size


def cut_map(image_size, config) -> tuple[int, int]:
    """(height, width) in patches of one image's tile map after the padding cut: transformers' own `unpad_image`,
    run on an empty map of the grid's shape."""
    n, (rows, cols) = side(config), tile_grid(image_size, config)
    height, width = unpad_image(torch.empty(0, rows * n, cols * n), _size(image_size)).shape[1:]
    return height, width


def stock_tokens(image_size, config) -> int:
    """The tokens stock LLaVA-NeXT hands the LLM for one image, and so the placeholders its processor writes: the
    base view's patches, the tiles' feature map after the padding cut, and one newline per remaining row."""
    height, width = cut_map(image_size, config)
    return side(config) ** 2 + height * (width + 1)


def crop_count_range(config) -> list[int]:
    """Every crop count an image can have on this model: 1 + the tiles of each grid (LLaVA-1.6: 3, 4 and 5)."""
    n = config.vision_config.image_size
    return sorted({1 + (h // n) * (w // n) for h, w in config.image_grid_pinpoints})


def most_stock_tokens(config) -> int:
    """The most tokens stock LLaVA-NeXT hands the LLM for one image: an image the exact size of a grid, which has
    no padding to cut (2,928 on LLaVA-1.6, a 2 x 2 grid)."""
    return max(stock_tokens((h, w), config) for h, w in config.image_grid_pinpoints)


def split_budget(total: int, crops: int) -> list[int]:
    """`anyres.budget: per_image`: an image's count over its crops as evenly as counts allow, the base view first,
    then the tiles in grid order, each taking one of the remainder (160 over 3 crops: 54, 53, 53)."""
    q, r = divmod(total, crops)
    return [q + (i < r) for i in range(crops)]


def flatten_crops(pixel_values: torch.Tensor, crops: list[int]) -> torch.Tensor:
    """(B, max crops, 3, S, S) padded to the batch's most crops, or (sum crops, 3, S, S) -> (sum crops, 3, S, S)."""
    if pixel_values.dim() == 4:
        return pixel_values
    return torch.cat([pixels[:n] for pixels, n in zip(pixel_values, crops)], dim=0)


# In a batch whose crops kept different counts (`anyres.budget: per_image`), each crop's tokens are padded to the
# most any crop kept; a padding slot's place is ABSENT, and no order below hands it on.
ABSENT = -2


def raster_order(places: torch.Tensor, grid: tuple[int, int], n: int) -> torch.Tensor:
    """The order that puts one image's tokens where stock LLaVA-NeXT reads them: the base view's first, as they
    come, then the tiles' patches in raster order over the whole grid (a row of the map crosses every tile of a
    grid row), then the tiles' tokens that stand for no single patch (fused or merged ones), tile after tile.

    places: (crops, K) each token's patch index (row-major within its crop, n x n), -1 or ABSENT; crop 0 is the
    base view, crops 1.. the tiles in row-major order over the (rows, cols) grid. Returns (T,) indices into the
    crops' tokens flattened crop after crop, T the tokens that are not ABSENT."""
    crops, k = places.shape
    rows, cols = grid
    if crops != 1 + rows * cols:
        raise ValueError(f"{crops} crops for a {rows} x {cols} grid of tiles and a base view")
    tile = torch.arange(crops - 1, device=places.device)[:, None]  # (tiles, 1)
    p = places[1:]  # (tiles, K)
    r, c = p // n, p % n  # the patch's row and column within its tile
    cell = ((tile // cols) * n + r) * (cols * n) + (tile % cols) * n + c  # (tiles, K) its raster index in the map
    unplaced = rows * cols * n * n + tile * k + torch.arange(k, device=places.device)  # after every cell, in order
    key = torch.where(p >= 0, cell, unplaced)  # (tiles, K)
    key = torch.where(p == ABSENT, rows * cols * (n * n + k), key)  # after everything: cut off below
    present = int((p != ABSENT).sum())
    tiles = k + torch.sort(key.flatten(), stable=True).indices[:present]  # (tiles' present tokens,)
    return torch.cat([torch.nonzero(places[0] != ABSENT).flatten(), tiles])


# Where an image's tokens came from, for reports and overlays: a crop-major patch index, crop * side^2 + patch
# (crop 0 the base view, crops 1.. the tiles in row-major order over the grid), or -1 for a token that stands for no
# single patch (an image_newline, a fused or merged token).


def stock_places(image_size, config) -> torch.Tensor:
    """(stock_tokens,) the crop-major patch index of each token of the stock layout, -1 for the newlines: the base
    view's patches, then the tiles' feature map after transformers' own padding cut, a newline after each row."""
    n, (rows, cols) = side(config), tile_grid(image_size, config)
    r = torch.arange(rows * n)[:, None]  # the map's rows and columns
    c = torch.arange(cols * n)[None]
    cells = (1 + (r // n) * cols + c // n) * n * n + (r % n) * n + c % n  # (rows n, cols n)
    kept = unpad_image(cells[None], _size(image_size))[0]  # (h, w)
    with_newlines = torch.cat([kept, kept.new_full((kept.shape[0], 1), -1)], dim=1)
    return torch.cat([torch.arange(n * n), with_newlines.flatten()])


def crop_major(places: torch.Tensor, config) -> torch.Tensor:
    """(crops, K) each crop's kept patch indices (-1: no single patch; ABSENT: padding) -> (crops K,) their
    crop-major indices, -1 and ABSENT as they were."""
    n = side(config)
    crop = torch.arange(places.shape[0], device=places.device)[:, None]
    return torch.where(places >= 0, crop * n * n + places, places).flatten()


def places_of(places: torch.Tensor, order: torch.Tensor, config) -> torch.Tensor:
    """The crop-major patch index of each token an image hands the LLM in `order` (indices into its crop tokens
    flattened crop after crop; -1: a newline), -1 for a newline or a token that stands for no single patch."""
    flat = crop_major(places, config)
    return torch.where(order >= 0, flat[order.clamp_min(0)], -1)


def stock_order(places: torch.Tensor, image_size, config) -> torch.Tensor:
    """VisPruner's NeXT layout (the config's `anyres.layout: stock`): the stock layout with only the kept patches.
    Returns (T,) indices into the image's crop tokens flattened crop after crop, -1 where an image_newline goes:
    the base view's kept patches in patch order, then the tile map cut to the image in raster order, its kept
    patches and a newline after every row, then the tokens that stand for no single patch (-1 in `places`), crop
    after crop. Kept patches in the letterbox vanish. places: (crops, K) each crop's kept patch indices, -1 or
    ABSENT."""
    n = side(config)
    flat = crop_major(places, config)  # (crops K,)
    token_at = torch.full((places.shape[0] * n * n,), -2, dtype=torch.long, device=places.device)  # -2: not kept
    placed = torch.nonzero(flat >= 0).flatten()
    token_at[flat[placed]] = placed
    stock = stock_places(image_size, config).to(places.device)  # (S,) crop-major index, -1: newline
    at = torch.where(stock >= 0, token_at[stock.clamp_min(0)], -1)  # (S,) the token there, -1 newline, -2 none
    unplaced = torch.nonzero(flat == -1).flatten()  # ABSENT padding goes nowhere
    return torch.cat([at[at != -2], unplaced])


@dataclass(frozen=True)
class AnyResLayout:
    """What each image of a LLaVA-NeXT batch hands the LLM. per_crop: the tokens stage 1 leaves each crop, or with
    per_image set (`anyres.budget: per_image`) the image's count, split over its crops (split_budget). stock: the
    stock layout's order, padding cut and newlines (nothing pruned before the LLM, so an in-LLM stage prunes over
    it; or the config's `anyres.layout: stock`). variable: stock with only the kept patches, whose count is known
    once the tower has picked them (stock_order); else each image hands on its crops' counts in the survivors'
    order (raster_order)."""

    config: object  # the LlavaNextConfig
    per_crop: int
    stock: bool
    variable: bool = False
    per_image: int | None = None
    units_are_images: bool = False  # `anyres.budget: per_image`: stage 2 keeps its counts per image, not per crop

    def crop_budgets(self, crops: int) -> list[int]:
        """The tokens stage 1 leaves each crop of an image of `crops` crops, base view first."""
        return [self.per_crop] * crops if self.per_image is None else split_budget(self.per_image, crops)

    def counts(self, num_images: int, image_sizes, handed_on=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(placeholders the processor wrote, tokens the model hands on), (num_images,) each. handed_on: the counts
        of a variable layout, read off the image features (an upper bound, the stock count, without them)."""
        if image_sizes is None or len(image_sizes) != num_images:
            got = "none" if image_sizes is None else len(image_sizes)
            raise InputError(f"LLaVA-NeXT needs image_sizes, one (height, width) per image: {num_images} image(s), "
                             f"{got} given (the processor returns them beside pixel_values)")
        full = torch.tensor([stock_tokens(size, self.config) for size in image_sizes], dtype=torch.long)
        if self.variable:
            return full, full if handed_on is None else torch.as_tensor(handed_on, dtype=torch.long)
        if self.stock:
            return full, full
        kept = [sum(self.crop_budgets(n)) for n in crop_counts(image_sizes, self.config)]
        return full, torch.tensor(kept, dtype=torch.long)

    def expected(self, image_size) -> int:
        """The tokens one image hands on, and for a variable layout their expectation with the kept patches
        spread evenly over the tiles (what `ivtp flops` prices): the base view's count, the tiles' in the share of
        their map left after the padding cut, and one newline per row left."""
        if not self.variable:
            return int(self.counts(1, [image_size])[1][0])
        budgets = self.crop_budgets(crop_count(image_size, self.config))
        height, width = cut_map(image_size, self.config)
        tiles = (len(budgets) - 1) * side(self.config) ** 2
        return budgets[0] + round(sum(budgets[1:]) * height * width / tiles) + height

    @property
    def every_patch(self) -> bool:
        """Nothing pruned before the LLM: every patch, in the stock layout (transformers' own packing)."""
        return self.stock and not self.variable
