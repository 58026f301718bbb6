"""Which volumes go to train, val and test (``data.params.split``), and the ``split.csv`` record.

Modes:
  slab:    every volume is cut into train | gap | val | gap | test slabs (the DataModule does
           the cutting); the volumes' subjects play no part. Same-subject test data.
  volume:  whole volumes per split in sorted-name order (train first, test last); refused
           when two volumes of one subject would land in different splits.
  subject: whole subjects per split, so that the volumes of one subject never cross splits.
           A manifest's explicit ``split`` wins (every volume of that subject follows it);
           the other subjects are ordered by sha256(seed, subject) (seeded, independent of
           the order of the list, and adding a subject moves few others) and cut by
           ``fractions`` within each modality group (subjects with CT only, MR only, both),
           so that val and test get each modality where the group is large enough. Train,
           val and test each get at least one subject.
  file:    ``{file: .../split.csv}`` (any other mode given beside it is overridden): the
           assignment a previous run wrote, reused exactly.
           Every volume must be listed by name, no row may name a volume the list lacks,
           and no subject may cross splits under the current subjects.

``split.csv`` (``write_split_file``): columns name, path, subject, split; one row per volume,
sorted by name; ``slab`` in the split column for a slab split (every volume in all three).
"""
from __future__ import annotations

import csv
import hashlib
import io
import warnings
from pathlib import Path

from utils.atomic import atomic_write
from utils.paths import resolve_path

SPLITS = ("train", "val", "test")
MODES = ("slab", "volume", "subject", "file")
SPLIT_COLUMNS = ("name", "path", "subject", "split")
DEFAULT_SPLIT = {"mode": "slab", "fractions": [0.7, 0.15, 0.15], "gap": 4, "file": None}


def check_split_config(split) -> dict:
    """The split config with defaults: mode, fractions, gap, file; ValueError naming a bad key.
    A ``file`` means mode ``file`` whatever ``mode`` says (an override ``split={file: ...}``
    merges into the config's split mapping, whose mode it replaces)."""
    given = {k: split[k] for k in split} if split is not None else {}
    cfg = dict(DEFAULT_SPLIT)
    cfg.update(given)
    unknown = set(cfg) - set(DEFAULT_SPLIT)
    if unknown:
        raise ValueError(f"unknown split key(s) {sorted(unknown)}: allowed {sorted(DEFAULT_SPLIT)}")
    if cfg["file"] not in (None, ""):
        cfg["mode"] = "file"
    if cfg["mode"] not in MODES:
        raise ValueError(f"unknown split mode {cfg['mode']!r}: expected one of {', '.join(repr(m) for m in MODES)}")
    if cfg["mode"] == "file" and cfg["file"] in (None, ""):
        raise ValueError("split: mode 'file' needs `file: <split.csv of an earlier run>`")
    fractions = [float(f) for f in cfg["fractions"]]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {fractions} must be 3 positive numbers summing to 1")
    if int(cfg["gap"]) < 0:
        raise ValueError(f"split gap {cfg['gap']} must be >= 0 slices")
    file = resolve_path(cfg["file"]) if cfg["mode"] == "file" else None
    return {"mode": cfg["mode"], "fractions": fractions, "gap": int(cfg["gap"]), "file": file}


def volume_split(n_volumes: int, fractions) -> tuple[range, range, range]:
    """Positions of whole volumes (sorted order) in train, val and test."""
    if n_volumes < 3:
        raise ValueError(f"volume split needs at least 3 volumes, got {n_volumes}: use split mode 'slab'")
    n_val = max(1, int(round(fractions[1] * n_volumes)))
    n_test = max(1, int(round(fractions[2] * n_volumes)))
    n_train = n_volumes - n_val - n_test
    if n_train < 1:
        raise ValueError(f"volume split fractions {list(fractions)} leave no training volume out of {n_volumes}")
    return range(0, n_train), range(n_train, n_train + n_val), range(n_train + n_val, n_volumes)


def refuse_explicit(volumes: list[dict], mode: str) -> None:
    """ValueError naming the manifest rows that give a split a ``mode`` split ignores."""
    given = [f"{v['where']} ({v['split']})" for v in volumes if v.get("split")]
    if given:
        raise ValueError(f"split mode {mode!r} ignores the split column of the manifest, which sets "
                         f"{', '.join(given[:8])}{' ...' if len(given) > 8 else ''}: use split mode 'subject'")


def check_no_crossing(volumes: list[dict], assignment: dict[str, str], how: str) -> None:
    """ValueError naming each subject whose volumes lie in different splits."""
    by_subject: dict[str, dict[str, list[str]]] = {}
    for v in volumes:
        by_subject.setdefault(v["subject"], {}).setdefault(assignment[v["name"]], []).append(v["name"])
    crossing = [f"subject {s!r}: " + "; ".join(f"{part} {names}" for part, names in sorted(parts.items()))
                for s, parts in sorted(by_subject.items()) if len(parts) > 1]
    if crossing:
        raise ValueError(f"{how} puts one subject's volumes into several splits: " + " | ".join(crossing[:8]))


def _order(seed: int, subject: str) -> str:
    return hashlib.sha256(f"{int(seed)}\0{subject}".encode()).hexdigest()


def _counts(n: int, fractions) -> tuple[int, int]:
    """(val, test) subject counts of a group of n, leaving train at least one where n > 0."""
    n_val, n_test = int(round(fractions[1] * n)), int(round(fractions[2] * n))
    while n_val + n_test >= n and n_val + n_test > 0:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def subject_split(volumes: list[dict], fractions, seed: int) -> dict[str, str]:
    """{volume name: split} of the subject mode (module docstring)."""
    subjects: dict[str, list[dict]] = {}
    for v in volumes:
        subjects.setdefault(v["subject"], []).append(v)
    fixed: dict[str, str] = {}
    for s, vols in subjects.items():
        given = {v["split"] for v in vols if v.get("split")}
        if len(given) > 1:
            rows = ", ".join(f"{v['where']} ({v['split']})" for v in vols if v.get("split"))
            raise ValueError(f"subject {s!r} is given several splits: {rows}; a subject's volumes share one split")
        if given:
            fixed[s] = given.pop()
    groups: dict[str, list[str]] = {}
    for s, vols in subjects.items():
        if s not in fixed:
            groups.setdefault("+".join(sorted({str(v["modality"]) for v in vols})), []).append(s)
    chosen = dict(fixed)
    for key in sorted(groups):
        ordered = sorted(groups[key], key=lambda s: _order(seed, s))
        n_val, n_test = _counts(len(ordered), fractions)
        for i, s in enumerate(ordered):
            chosen[s] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    for part in ("test", "val"):  # each split needs a subject: take one from the largest group's train
        if part in chosen.values():
            continue
        donors = [(sum(chosen[s] == "train" for s in groups[k]), k) for k in sorted(groups)]
        donors = [(n, k) for n, k in donors if n > 0]
        if not donors or sum(v == "train" for v in chosen.values()) < 2:
            raise ValueError(f"subject split needs at least 3 subjects (one each for train, val and test), "
                             f"got {len(subjects)} ({len(fixed)} with a split given)")
        _, key = max(donors, key=lambda d: (d[0], d[1]))
        last = [s for s in sorted(groups[key], key=lambda s: _order(seed, s)) if chosen[s] == "train"][-1]
        chosen[last] = part
    if "train" not in chosen.values():
        raise ValueError("subject split: no subject left for training (every subject's split is given as val or test)")
    return {v["name"]: chosen[v["subject"]] for v in volumes}


def read_split_file(path: Path, volumes: list[dict]) -> dict[str, str]:
    """{volume name: split} of a ``split.csv``; ValueError naming the rows that do not fit the
    current volume list (module docstring). A volume at another path warns (moved data)."""
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if sorted(header) != sorted(SPLIT_COLUMNS):
        raise ValueError(f"{path} line 1: header {header}: a split file has the columns {', '.join(SPLIT_COLUMNS)}")
    by_name = {v["name"]: v for v in volumes}
    found, bad, moved = {}, [], []
    for line, raw in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in raw):
            continue
        row = dict(zip(header, (c.strip() for c in raw)))
        name, part = row.get("name", ""), row.get("split", "").lower()
        if name in found:
            bad.append(f"line {line}: volume {name!r} is listed twice")
        elif name not in by_name:
            bad.append(f"line {line}: volume {name!r} is not in data.params.volumes")
        elif part == "slab":
            bad.append(f"line {line}: {name!r} was slab-split (every volume in all three splits): use split mode 'slab'")
        elif part not in SPLITS:
            bad.append(f"line {line}: split {row.get('split')!r} is not one of {', '.join(SPLITS)}")
        else:
            found[name] = part
            if Path(row.get("path", "")) != Path(by_name[name]["path"]):
                moved.append(f"{name}: {row.get('path')} -> {by_name[name]['path']}")
            given = by_name[name].get("split")
            if given and given != part:
                bad.append(f"line {line}: {name!r} is {part} here, {given} in {by_name[name]['where']}")
    bad += [f"volume {n!r} ({v['where']}) is not listed" for n, v in by_name.items() if n not in found]
    if bad:
        raise ValueError(f"split file {path}: {len(bad)} problem(s): " + "; ".join(bad[:12])
                         + (f"; and {len(bad) - 12} more" if len(bad) > 12 else ""))
    if moved:
        warnings.warn(f"split file {path}: {len(moved)} volume(s) have another path now (same name, same split): "
                      + "; ".join(moved[:5]))
    missing = [p for p in SPLITS if p not in found.values()]
    if missing:
        raise ValueError(f"split file {path} has no {' or '.join(missing)} volume")
    check_no_crossing(volumes, found, f"split file {path}")
    return found


def assign_volumes(volumes: list[dict], cfg: dict, seed: int, order: list[str] | None = None) -> dict[str, str]:
    """{volume name: train|val|test|slab} for the split config ``cfg`` (check_split_config).
    ``order``: the volume names in the volume mode's order (default: sorted names)."""
    mode = cfg["mode"]
    if mode == "slab":
        refuse_explicit(volumes, mode)
        return {v["name"]: "slab" for v in volumes}
    if mode == "volume":
        refuse_explicit(volumes, mode)
        names = list(order) if order is not None else sorted(v["name"] for v in volumes)
        assignment = {}
        for part, positions in zip(SPLITS, volume_split(len(names), cfg["fractions"])):
            assignment.update({names[i]: part for i in positions})
        check_no_crossing(volumes, assignment, "split mode 'volume' (sorted names)")
        return assignment
    if mode == "subject":
        return subject_split(volumes, cfg["fractions"], seed)
    return read_split_file(cfg["file"], volumes)


def split_table(volumes: list[dict], assignment: dict[str, str]) -> str:
    """The text of a split.csv."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SPLIT_COLUMNS)
    for v in sorted(volumes, key=lambda v: v["name"]):
        writer.writerow([v["name"], Path(v["path"]).as_posix(), v["subject"], assignment[v["name"]]])
    return out.getvalue()


def write_split_file(path, volumes: list[dict], assignment: dict[str, str]) -> Path:
    """Write ``split.csv`` atomically (a killed write leaves the old file or none)."""
    text = split_table(volumes, assignment)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
