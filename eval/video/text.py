"""Zero-shot scoring of videos against class-name embeddings.

The CLIP text tower itself (loader, templates, class embeddings, image projection) is
``cosettle.pipeline.text_tower``, shared with the trainer's concepts objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def zeroshot_scores(video_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [N, C] of video embeddings [N, E] and class embeddings [C, E]."""
    if video_embeddings.shape[-1] != class_embeddings.shape[-1]:
        raise ValueError(f"video embeddings of width {video_embeddings.shape[-1]}, "
                         f"class embeddings of width {class_embeddings.shape[-1]}")
    v = F.normalize(video_embeddings.float(), dim=-1)
    c = F.normalize(class_embeddings.float().to(v.device), dim=-1)
    return v @ c.T
