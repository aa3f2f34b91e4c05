"""Prefix fusion (LLaVA, MM1, BLIP-2 stage 2, Qwen-VL, ...): connector outputs replace the embeddings at the
image-token positions of the text, image by image, in reading order.

The contract: a sample holding ``k`` images holds exactly ``k * T`` image tokens. When that fails the error
names the sample, so a bad record is found in seconds rather than by a shape error deep in a model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


class ImageTokenMismatch(ValueError):
    """Image tokens in the text do not match the image features given for a sample."""


def splice_image_features(
    text_embeds: Tensor,
    input_ids: Tensor,
    image_token_id: int,
    image_embeds: Tensor | None,
    images_per_row: Sequence[int],
    sample_ids: Sequence[str] | None = None,
) -> Tensor:
    """Write image embeddings into the text embeddings at the image-token positions.

    Args:
        text_embeds: ``[B, L, D]`` token embeddings (a row is a sample, or several packed samples).
        input_ids: ``[B, L]`` token ids; ``image_token_id`` marks image positions.
        image_token_id: Id of the image placeholder token.
        image_embeds: ``[I, T, D]`` connector outputs for all tower inputs (images or tiles) of the batch, in
            reading order (``I = sum(images_per_row)``), or None when the batch has no image.
        images_per_row: Number of tower inputs in each row.
        sample_ids: Names of the rows' samples, for error messages.

    Returns:
        ``[B, L, D]`` embeddings; text positions unchanged.
    """
    is_image = input_ids == image_token_id  # [B, L]
    tokens_per_sample = is_image.sum(dim=1).tolist()
    per_image = 0 if image_embeds is None else image_embeds.shape[1]
    num_images = 0 if image_embeds is None else image_embeds.shape[0]
    if sum(images_per_row) != num_images:
        raise ImageTokenMismatch(
            f"the batch lists {sum(images_per_row)} images but {num_images} image feature sets were given"
        )
    for b, (tokens, images) in enumerate(zip(tokens_per_sample, images_per_row)):
        if tokens != images * per_image:
            name = sample_ids[b] if sample_ids is not None else f"#{b} of the batch"
            raise ImageTokenMismatch(
                f"sample {name!r} has {tokens} image tokens in its text but {images} image(s) x {per_image} "
                f"features = {images * per_image}; each <image> placeholder must expand to {per_image} tokens"
            )
    if num_images == 0:
        return text_embeds
    mask = is_image.unsqueeze(-1).expand_as(text_embeds)
    return text_embeds.masked_scatter(mask, image_embeds.to(text_embeds.dtype))
