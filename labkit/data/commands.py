"""`labkit data ...`: audit a dataset's masking (`check`) and write a card for a data file (`add`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def cmd_check(args: argparse.Namespace) -> int:
    from labkit.data import audit

    result, _ = audit.audit(args.dataset, args.model, max_seq_len=args.max_seq_len, overlong=args.overlong,
                            chat_template=args.chat_template, reasoning=args.reasoning, train_on=args.train_on,
                            on_bad_record=args.on_bad_record)
    print(json.dumps(result.as_dict(), indent=1) if args.json else result)
    problems = result.problems(min_labelled_share=args.min_labelled_share, max_no_label_share=args.max_no_label,
                               max_dropped_share=args.max_dropped)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_add(args: argparse.Namespace) -> int:
    from labkit import catalog
    from labkit.data import formats

    path = Path(args.path).expanduser().resolve()
    formats.container(path)
    sniffed = {"format": args.format} if args.format else formats.sniff(path)
    name = args.name or path.stem
    directory = Path(args.catalog) if args.catalog else catalog.catalog_dir()
    card_file = directory / f"{name}.yaml"
    if card_file.exists() and not args.overwrite:
        raise ValueError(f"{card_file} exists (use --overwrite)")
    card = {"name": name, "path": str(path), "kind": args.kind, **sniffed}
    probe = catalog.Card(name=name, path=path, kind=args.kind, format=sniffed["format"],
                         extra={k: v for k, v in sniffed.items() if k != "format"})
    records, report = formats.read(probe, on_error="skip")
    card["samples"] = len(records)
    directory.mkdir(parents=True, exist_ok=True)
    card_file.write_text(yaml.safe_dump(card, sort_keys=False))
    print(f"{card_file}: {name}, format {sniffed['format']}, {report}")
    for p in report.problems[:5]:
        print(f"  skipped {p}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Register `labkit data check|add` on the top-level subparsers."""
    data = sub.add_parser("data", help="dataset tools: masking audit (check), write a card (add)",
                          description="dataset tools: masking audit (check), write a card (add)")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    c = dsub.add_parser("check", help="whole-dataset masking audit under a model's tokenizer and template")
    c.add_argument("dataset", help="catalog name, data path or hf:owner/name")
    c.add_argument("--model", default="tiny", help="model directory (default: tiny)")
    c.add_argument("--chat-template", help="built-in (chatml, llama3, granite) or .jinja file")
    c.add_argument("--max-seq-len", type=int, default=2048)
    c.add_argument("--overlong", choices=["drop", "truncate"], default="drop")
    c.add_argument("--reasoning", choices=["keep", "drop", "template"], default="keep")
    c.add_argument("--train-on", choices=["assistant", "last_assistant", "all"], default="assistant")
    c.add_argument("--on-bad-record", choices=["raise", "skip"], default="skip")
    c.add_argument("--min-labelled-share", type=float, default=0.01, help="fail below this labelled share")
    c.add_argument("--max-no-label", type=float, default=0.05, help="fail above this share of unlabelled samples")
    c.add_argument("--max-dropped", type=float, default=0.05, help="fail above this share of dropped records")
    c.add_argument("--json", action="store_true", help="print the audit as JSON")
    c.set_defaults(handler=cmd_check)
    a = dsub.add_parser("add", help="sniff a data file's format and write a dataset card for it")
    a.add_argument("path", help="data file, save_to_disk directory")
    a.add_argument("--name", help="dataset name (default: the file name)")
    a.add_argument("--kind", default="other", choices=["knowledge", "skills", "eval", "other"])
    a.add_argument("--format", help="skip sniffing: chat, sharegpt, alpaca, prompt-completion or text")
    a.add_argument("--catalog", help="catalog directory (default: $LABKIT_CATALOG or ./data_catalog)")
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(handler=cmd_add)
