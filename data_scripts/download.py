"""Download a public cohort, verify it, extract it safely, and prepare it for training.

    python data_scripts/download.py ixi-t1 --root data/ --size 64
    python data_scripts/download.py decathlon-brain --root data/ --modality flair
    python data_scripts/download.py ixi-t2 --root data/ --url https://my.mirror/IXI-T2.tar   # same checksum

The archives are large (IXI T1: about 4.5 GB; Decathlon brain tumour: 7.6 GB). An interrupted download
continues where it stopped when the command is run again.
"""

import argparse
import dataclasses
import sys

from alphagan.data.download import ARCHIVES, DownloadError, get_dataset
from alphagan.data.prepare import prepare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(ARCHIVES))
    parser.add_argument("--root", default="data", help="where archives, images and the cache go")
    parser.add_argument("--url", default=None, help="a mirror of the archive (its checksum must match)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--modality", default=None, help="decathlon: flair, t1, t1gd or t2")
    parser.add_argument("--no-prepare", action="store_true", help="download and extract only")
    args = parser.parse_args(argv)

    archive = ARCHIVES[args.dataset]
    if args.url:
        archive = dataclasses.replace(archive, url=args.url)
    try:
        folder, layout = get_dataset(args.dataset, args.root, archive)
    except DownloadError as exc:
        print(f"download: {exc}", file=sys.stderr)
        return 1
    print(f"images in {folder} (layout {layout})")
    if args.no_prepare:
        return 0
    cache = f"{args.root}/cache-{args.dataset}-{args.modality or 'default'}-{args.size}"
    result = prepare(str(folder), cache, size=args.size, layout=layout, modality=args.modality)
    print(f"cache {result.out}: {result.written + result.reused} volumes, {len(result.rejected)} rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
