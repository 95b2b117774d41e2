"""The ``pyodlog`` command: one entry point for every tool.

    pyodlog info [PATH]        what is installed and built; or what a result folder / ZIP holds
    pyodlog demo               the demo job (a real detector logged into local HDF5)
    pyodlog serve ...          run the reference collector
    pyodlog list ...           the results a collector's root holds
    pyodlog export ...         a result a collector holds, as a pyodlog ZIP (checked, read by pyodlog)
    pyodlog keygen FILE ...    append a new API key to a collector's key file
    pyodlog report PATH ...    an HTML report of a result (--json: its numbers; --against: drift)

    pyodlog view PATH          a local web page to look at a result (gallery, images, result)

This module sits at the top of the layers (docs/architecture.md): it is the one place that puts the
reference collector behind the same command as the library. The library proper never imports the
collector. Nothing heavy is imported before a subcommand needs it, so ``pyodlog --help`` and the
collector's commands start without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

# Subcommands implemented by the reference collector's own command line (stdlib only, no torch).
COLLECTOR_COMMANDS = {
    "serve": "run the reference collector (HTTP or HTTPS) that auto_sync/upload() send to",
    "list": "list the results a collector's root folder holds",
    "keygen": "append a new random API key to a collector's key file (created 0600)",
}
LIBRARY_COMMANDS = {
    "info": "what is installed and built (no PATH); what a result folder or ZIP holds (PATH)",
    "export": "export a result a collector holds as the ZIP that logger.export() writes",
    "demo": "log a real torchvision detector over generated images into local HDF5 (make demo)",
    "report": "an HTML report (and --json numbers) of a result folder or ZIP; --against: drift",
    "view": "look at a result in the browser: gallery with boxes, image pages, result page",
}


def result_location(text: str) -> str | Path:
    """A result's location as given: a URL (``s3://...``) stays a string — ``Path`` would fold its
    ``//`` — and anything else is a local path."""
    return text if "://" in text else Path(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyodlog",
        description="pyodlog: a monitoring logger for PyTorch object detectors, and its tools. "
        "`pyodlog COMMAND --help` tells more about each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help=LIBRARY_COMMANDS["info"])
    info.add_argument(
        "path",
        nargs="?",
        type=result_location,
        help="a result folder (PYODLOG_HOME/MODEL/VERSION/RESULT), an exported ZIP or an "
        "s3://bucket/prefix/MODEL/VERSION/RESULT",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    export = sub.add_parser(
        "export",
        help=LIBRARY_COMMANDS["export"],
        description="Merges the segments a collector holds for one result of one tenant into the ZIP "
        "that logger.export() writes. Every segment is checked first (only pyodlog's layout, nothing "
        "outside the file); if one is not a valid segment, nothing is exported.",
    )
    export.add_argument("--root", required=True, type=Path, help="the collector's --root folder")
    export.add_argument("--tenant", default="default", help="the tenant (default: default)")
    export.add_argument("model")
    export.add_argument("version")
    export.add_argument("result")
    export.add_argument("--epoch", type=int, default=None, help="only this epoch (default: all)")
    export.add_argument(
        "-o", "--output", type=Path, help="the ZIP to write (default: ./MODEL_VERSION_RESULT.zip)"
    )
    sub.add_parser("demo", help=LIBRARY_COMMANDS["demo"])
    _add_report_parser(sub)

    _add_view_parser(sub)
    for name, text in COLLECTOR_COMMANDS.items():
        # Parsed by the collector's own parser: listed here for --help only.
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _add_view_parser(sub: Any) -> None:
    view = sub.add_parser(
        "view",
        help=LIBRARY_COMMANDS["view"],
        description="Serves a read-only web app for a result: a gallery of the logged images with "
        "their boxes (filters, sorts, pages), a page per image (detections, near-misses, top-5 "
        "classes, uncertainty) and a result page (class counts, histograms, embedding map). It "
        "listens on loopback unless --host says otherwise and never writes into the result.",
    )
    view.add_argument(
        "path",
        type=result_location,
        help="a result folder, an exported ZIP, an s3:// result, or a PYODLOG_HOME to pick one of its results from",
    )
    view.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    view.add_argument(
        "--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)"
    )
    view.add_argument("--open", action="store_true", help="open the page in the default browser")
    view.add_argument(
        "--images-root",
        type=Path,
        default=None,
        help="folder where input_ids name image files (shown when no thumbnail was logged)",
    )


def _view(args: argparse.Namespace) -> int:
    from pyodlog.viewer import serve

    try:
        serve(args.path, args.host, args.port, args.open, args.images_root)
    except (OSError, ValueError) as error:
        print(f"pyodlog view: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _installation() -> dict[str, Any]:
    import torch

    import pyodlog
    from pyodlog._extension import ExtensionNotBuiltError, build_info
    from pyodlog.io.store import data_root

    facts: dict[str, Any] = {"pyodlog": pyodlog.__version__, "torch": torch.__version__}
    try:
        facts["extension"] = build_info()
    except ExtensionNotBuiltError as error:
        facts["extension"] = f"not available: {error}"
    root = data_root()
    facts["data_root"] = str(root)
    facts["results"] = sorted(
        str(p.parent.relative_to(root)) for p in root.glob("*/*/*/result.json")
    )
    return facts


def _result_summary(path: str | Path) -> dict[str, Any]:
    import numpy as np

    from pyodlog.io.reader import open_result

    result = open_result(path)
    images = result.images
    n = len(result)
    summary: dict[str, Any] = {
        "path": str(path),
        "images": n,
        "detections": int(np.sum(images["det_count"])) if n else 0,
        "epochs": sorted({int(e) for e in images["n_epoch"]}) if n else [],
        "dataset_types": sorted(set(images["dataset_type"])) if n else [],
        "features": result.feature_names(),
        "fields": sorted(
            f["name"] for f in result.manifest.get("schema", {}).get("additional_fields", [])
        ),
    }
    for key in ("model_name", "version_name", "result_name", "n_class"):
        if key in result.manifest:
            summary[key] = result.manifest[key]
    return summary


def _info(args: argparse.Namespace) -> int:
    try:
        facts = _result_summary(args.path) if args.path is not None else _installation()
    except (OSError, ValueError, KeyError) as error:
        print(f"pyodlog info: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
    else:
        for key, value in facts.items():
            print(f"{key:>14}: {value}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pyodlog_protocol.layout import stored_segments

    try:
        segments = stored_segments(args.root, args.tenant, args.model, args.version, args.result)
    except ValueError as error:
        print(f"pyodlog export: {error}", file=sys.stderr)
        return 2
    if not segments:
        print(
            f"pyodlog export: no segments for {args.model}/{args.version}/{args.result} of tenant "
            f"{args.tenant} under {args.root}",
            file=sys.stderr,
        )
        return 2
    from pyodlog.io.export import export_zip
    from pyodlog.io.reader import CorruptResultError

    output = args.output or Path(f"{args.model}_{args.version}_{args.result}.zip")
    meta = {
        "model_name": args.model,
        "version_name": args.version,
        "result_name": args.result,
        "exported_by": "pyodlog collector",
    }
    try:
        path = export_zip(segments, output, args.epoch, meta, strict=True)
    except CorruptResultError as error:
        print(
            f"pyodlog export: refusing to export: {error}\nRemove them from the collector root to "
            "export the rest.",
            file=sys.stderr,
        )
        return 2
    print(path)
    return 0


def _demo(_: argparse.Namespace) -> int:
    from pyodlog.demo import main as demo_main

    demo_main()
    return 0


def _add_report_parser(sub) -> None:
    report = sub.add_parser(
        "report",
        help=LIBRARY_COMMANDS["report"],
        description="Writes a self-contained HTML report of a result (overview, score and uncertainty "
        "histograms, per-class counts, evaluation when ground truth was logged, the most uncertain "
        "detections) and, with --against, the drift of PATH against a reference slice. --json prints "
        "the same numbers.",
    )
    report.add_argument(
        "path", type=result_location, help="a result folder, an exported ZIP or an s3:// result"
    )
    report.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep a slice: ResultData.where(KEY=VALUE), e.g. dataset_type=deploying n_epoch=3 "
        "(repeatable; a key given twice passes a list)",
    )
    report.add_argument(
        "--against",
        type=result_location,
        help="the reference result (folder, ZIP or s3://) to compare PATH with (drift)",
    )
    report.add_argument(
        "--against-where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="slice of the reference (default reference: PATH itself when only this is given)",
    )
    report.add_argument(
        "--out", type=Path, help="the HTML file to write (default: report.html unless --json)"
    )
    report.add_argument("--json", action="store_true", help="print the report's numbers as JSON")


def _sliced(path: str | Path, pairs: list[str], option: str):
    from pyodlog.io.reader import open_result

    data = open_result(path)
    if not pairs:
        return data
    from pyodlog.analysis.slices import parse_where

    kwargs = parse_where(pairs)
    where = getattr(data, "where", None)
    if where is None:
        raise ValueError(
            f"{option} needs ResultData.where (slices), which this pyodlog does not have: upgrade "
            f"pyodlog, or report the whole result without {option}"
        )
    return where(**kwargs)


def _report(args: argparse.Namespace) -> int:
    try:
        data = _sliced(args.path, args.where, "--where")
        against = None
        if args.against is not None or args.against_where:
            against = _sliced(args.against or args.path, args.against_where, "--against-where")
        from pyodlog.analysis.report import analyse, html_page

        numbers, drift = analyse(data, against)
        out = args.out if args.out is not None or args.json else Path("report.html")
        if out is not None:
            out.write_text(html_page(numbers, drift), encoding="utf-8")
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"pyodlog report: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(numbers, indent=2))
    else:
        print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``pyodlog COMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COLLECTOR_COMMANDS:
        from pyodlog_collector.cli import main as collector_main

        return collector_main(argv)
    args = _parser().parse_args(argv)
    commands = {"info": _info, "export": _export, "demo": _demo, "report": _report, "view": _view}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
