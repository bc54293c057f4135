"""Print an installed distribution's requirements that apply here (markers evaluated, extras left out),
one per line, except the ones named after --skip. Used by `make test-vllm026`."""

from __future__ import annotations

import argparse
from importlib import metadata

from packaging.requirements import Requirement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dist")
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    skip = {name.lower() for name in args.skip}
    for line in metadata.requires(args.dist) or []:
        req = Requirement(line)
        if req.name.lower() in skip or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        print(str(req).split(";")[0].strip())


if __name__ == "__main__":
    main()
