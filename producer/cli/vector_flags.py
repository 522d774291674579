"""`embedq embed`'s prompt and Matryoshka flags: --prompt-name / --prompt and --dimensions.

Resolved against the model before anything starts, so an unknown prompt name or too many dimensions
is exit 2 in one line naming the flag (and the folder's prompt names).
"""

from __future__ import annotations

import argparse
from typing import Any

from producer.cli.args import positive_int
from workers.protocol.dimensions import DimensionsUnsupported, check_dimensions
from workers.protocol.model_info import ModelInfo
from workers.protocol.prompts import UnknownPrompt, prompt_label, resolve_prompt


def add_vector_flags(parser: argparse.ArgumentParser) -> None:
    """Add --prompt-name, --prompt (one or the other) and --dimensions to `parser`."""
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompt-name",
        default=None,
        help="prepend the model folder's sentence-transformers prompt of this name to every text "
        "(default: the folder's default_prompt_name, else none)",
    )
    prompts.add_argument(
        "--prompt", default=None, help='prepend this text to every text instead ("" for none, whatever the default)'
    )
    parser.add_argument(
        "--dimensions",
        type=positive_int,
        default=None,
        help="keep the first N components of each vector (Matryoshka), then L2-normalise (default: the model's width)",
    )


def vector_options(args: argparse.Namespace, model: ModelInfo) -> dict[str, Any]:
    """JobOptions fields for the flags: the prompt text and its name, and the dimensions to keep (None: all)."""
    try:
        prompt = resolve_prompt(model, args.prompt_name, args.prompt)
    except UnknownPrompt as error:
        raise UnknownPrompt(f"--prompt-name {args.prompt_name}: {str(error).split(': ', 1)[-1]}") from None
    try:
        dimensions = check_dimensions(args.dimensions, model.dim, model.name)
    except DimensionsUnsupported as error:
        raise DimensionsUnsupported(f"--dimensions {args.dimensions}: {str(error).split(': ', 1)[-1]}") from None
    return {
        "prompt": prompt,
        "prompt_name": prompt_label(model, args.prompt_name, args.prompt),
        "dimensions": dimensions if dimensions != model.dim else None,
    }
