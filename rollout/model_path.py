"""What a model given as a local path must be: a folder holding ``config.json`` (`local_path_problem`).

Shared by the learner (``model.path``) and the rollout server (``--model``), so a missing or wrong folder is
one error naming the setting before anything loads. transformers and vLLM would take a missing folder for a
malformed hub id ("Repo id must use alphanumeric chars...").
"""

from __future__ import annotations

from pathlib import Path


def local_path_problem(path: str, key: str) -> str | None:
    """Why `path` (the setting `key`) cannot be a model folder, when it names a local path: one that exists,
    or reads as one (``/``, ``.`` or ``~`` first, more than one ``/``, or a first part that is a local
    folder); None otherwise. A hub id (``org/name``) is left to the hub.

    >>> local_path_problem("Qwen/Qwen2.5-Math-1.5B", "model.path") is None
    True
    >>> local_path_problem("./no-such-model", "--model").split(" (")[0]
    "--model='./no-such-model': no such folder"
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return None
        return f"{key}={path!r} holds no config.json: not a model folder (save one with save_pretrained)"
    if folder.exists():
        return f"{key}={path!r} is a file: give the model's folder (config.json, weights, tokenizer)"
    first = path.split("/")[0]
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or (first != path and Path(first).is_dir()):
        return (f"{key}={path!r}: no such folder (build the test models with `reasonrl tiny DIR`, or give a "
                "hub id such as Qwen/Qwen2.5-Math-1.5B)")
    return None
