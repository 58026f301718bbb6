"""The volume list of the DataModule (``data.params.volumes``): paths, mappings, globs and
CSV/TSV manifests, expanded into one checked entry per volume before anything is converted.

An entry of the list (or the whole value, as one string) is one of:
  - a path: a NIfTI file, a DICOM series folder or a built ``.h5`` file; relative paths are
    taken from the repository root; the modality from a ``ct``/``mr``/``mri`` token in the
    name (DICOM folders: the Modality tag);
  - a mapping ``{path, modality, name, subject}`` (all but ``path`` optional);
  - a glob (a path string with ``*``, ``?`` or ``[``; ``**`` recurses), or a mapping
    ``{glob, modality, subject}``: every match, folders as DICOM series; the name of a match
    is its path below the pattern's fixed folder with '/' replaced by '_' and the extension
    dropped (``scans/*.nii.gz`` -> the file stems); ``subject`` is a regular expression
    searched in that relative path (its first group, else the whole match); an empty match
    is refused;
  - a manifest: a ``.csv`` / ``.tsv`` file (comma / tab separated, a header row) with the
    columns ``path``, ``modality``, ``subject`` and optionally ``split`` (train / val / test,
    or empty) and ``name``; relative paths are taken from the manifest's folder; blank rows
    and rows whose first cell starts with ``#`` are skipped.

Every volume gets a ``subject`` (default: its name) and a ``split`` (from a manifest, else
None). Missing files, unknown modalities, repeated names or paths, bad split values, unknown
manifest columns and empty matches are refused in one error that names every bad row
(``manifest.csv line 4: ...``).
"""
from __future__ import annotations

import csv
import glob
import re
from pathlib import Path

from utils.intensity import check_modality
from utils.paths import check_name, resolve_path
from utils.volume_io import is_nifti, source_stem

MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t"}
MANIFEST_COLUMNS = ("path", "modality", "subject", "split", "name")
REQUIRED_COLUMNS = ("path", "modality", "subject")
SPLITS = ("train", "val", "test")
ENTRY_KEYS = ("path", "modality", "name", "subject")
GLOB_KEYS = ("glob", "modality", "subject")
MAX_LISTED = 12  # bad rows named in one error


def infer_modality(path: Path) -> str:
    """ct/mr from a file name holding "ct", "mr" or "mri" not touching other letters
    (ct_head, mr01, brain-mri); else ValueError."""
    found = {m.group(1)[:2] for m in re.finditer(r"(?<![a-z])(ct|mri?)(?![a-z])", source_stem(path).lower())}
    if len(found) != 1:
        raise ValueError(f"cannot infer the modality of {path} from its name: give {{path, modality: ct|mr}}")
    return found.pop()


def dicom_modality(folder: Path) -> str | None:
    """The Modality tag (lower case) of the first DICOM file of a series folder, None if none."""
    import pydicom

    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with open(file, "rb") as f:
                if f.read(132)[128:] != b"DICM":
                    continue
            return str(pydicom.dcmread(str(file), stop_before_pixels=True).get("Modality", "")).lower() or None
        except Exception:  # unreadable: the conversion names it
            continue
    return None


def volume_entry(entry, allowed: tuple[str, ...], where: str, index: int | None = None) -> dict:
    """A volume list entry (a path, or a mapping with 'path' and some of ``allowed``) as a
    dict; ValueError naming ``where`` (the config list) otherwise, and a ConfigError naming
    ``where[index].name`` for a ``name`` that is not a plain file name (utils.paths.check_name)."""
    if isinstance(entry, (str, Path)):
        entry = {"path": entry}
    elif hasattr(entry, "items"):
        entry = {k: entry[k] for k in entry}
    else:
        raise ValueError(f"{where} entry {entry!r} must be a path or a mapping with keys {', '.join(allowed)}")
    unknown = set(entry) - set(allowed)
    if "path" not in entry or unknown:
        raise ValueError(f"{where} entry {entry!r}: needs key 'path', allows only {', '.join(allowed)}")
    if entry.get("name") not in (None, ""):  # "" or null: the default name
        check_name(entry["name"], f"{where}[{index}].name" if index is not None else f"{where} entry name")
    return entry


def _volume(path: Path, modality, name, subject, split, where: str) -> dict:
    """One checked volume dict: path, h5, modality (None for .h5), name, subject, split, where."""
    if path.suffix.lower() == ".h5":
        modality = None
    elif modality not in (None, ""):
        modality = check_modality(str(modality))
    elif path.is_dir():
        modality = dicom_modality(path)
        if modality not in ("ct", "mr"):
            raise ValueError(f"{where}: the DICOM series {path} has Modality {modality!r}: give modality ct or mr")
    else:
        modality = infer_modality(path)
    name = name or source_stem(path)
    check_name(name, f"{where} name")
    return {"path": path, "h5": path.suffix.lower() == ".h5", "modality": modality, "name": name,
            "subject": str(subject) if subject not in (None, "") else name, "split": split or None, "where": where}


def parse_volume(entry, index: int | None = None) -> dict:
    """Normalize a path or ``{path, modality, name, subject}`` entry to a volume dict (the
    file need not exist yet: ``expand_volumes`` checks that)."""
    entry = volume_entry(entry, ENTRY_KEYS, "volumes", index)
    where = f"volumes[{index}]" if index is not None else "volumes"
    return _volume(resolve_path(entry["path"]), entry.get("modality"), entry.get("name"), entry.get("subject"),
                   None, where)


def is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand_glob(pattern: str, modality=None, subject=None, where: str = "volumes") -> list[dict]:
    """The volumes a glob matches (see the module docstring), sorted by path."""
    full = str(resolve_path(pattern))
    matches = sorted(Path(p) for p in glob.glob(full, recursive=True))
    if not matches:
        raise ValueError(f"{where}: the glob {pattern!r} matches nothing ({full})")
    parts = Path(full).parts
    fixed = Path(*parts[: next((i for i, p in enumerate(parts) if is_glob(p)), len(parts) - 1)])
    regex = re.compile(str(subject)) if subject else None
    out, bad = [], []
    for path in matches:
        rel = path.relative_to(fixed).as_posix()
        if path.is_file() and not (is_nifti(path) or path.suffix.lower() == ".h5"):
            bad.append(f"{rel}: not a .nii/.nii.gz/.h5 file or a DICOM series folder")
            continue
        name = (rel[: len(rel) - len(path.name)] + source_stem(path)).replace("/", "_")
        sub = None
        if regex is not None:
            found = regex.search(rel)
            if found is None:
                bad.append(f"{rel}: the subject pattern {regex.pattern!r} does not match")
                continue
            sub = found.group(1) if regex.groups else found.group(0)
        try:
            out.append(_volume(path, modality, name, sub, None, f"{where} glob {pattern!r} match {rel}"))
        except ValueError as err:
            bad.append(str(err))
    _refuse(f"{where}: the glob {pattern!r}", bad)
    return out


def _refuse(what: str, problems: list[str]) -> None:
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")
        raise ValueError(f"{what}: {len(problems)} bad row(s): {listed}")


def read_manifest(path, where: str = "volumes") -> list[dict]:
    """The volumes of a CSV/TSV manifest (see the module docstring); ValueError naming every
    bad line (missing file, unknown modality, empty subject, bad split, bad or repeated name)."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: manifest not found: {path}")
    delimiter = MANIFEST_SUFFIXES[path.suffix.lower()]
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    header_at = next((i for i, r in enumerate(rows) if any(c.strip() for c in r) and not r[0].strip().startswith("#")), None)
    if header_at is None:
        raise ValueError(f"{path}: empty manifest: expected a header row with {', '.join(REQUIRED_COLUMNS)}")
    header = [c.strip().lower() for c in rows[header_at]]
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise ValueError(f"{path} line {header_at + 1}: header {header}: needs the columns {', '.join(REQUIRED_COLUMNS)}"
                         f", allows {', '.join(MANIFEST_COLUMNS)}" + (f"; unknown {unknown}" if unknown else "")
                         + (f"; missing {missing}" if missing else ""))
    out, bad = [], []
    for line, raw in enumerate(rows[header_at + 1:], start=header_at + 2):
        if not any(c.strip() for c in raw) or raw[0].strip().startswith("#"):
            continue
        here = f"line {line}"
        if len(raw) > len(header):
            bad.append(f"{here}: {len(raw)} cells, the header has {len(header)}")
            continue
        row = dict(zip(header, [c.strip() for c in raw] + [""] * (len(header) - len(raw))))
        if not row["path"]:
            bad.append(f"{here}: empty path")
            continue
        file = Path(row["path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        problems = []
        if not file.exists():
            problems.append(f"file not found: {file}")
        if row["modality"].lower() not in ("ct", "mr"):
            problems.append(f"unknown modality {row['modality']!r} (expected ct or mr)")
        if not row["subject"]:
            problems.append("empty subject")
        split = row.get("split", "").lower()
        if split not in SPLITS + ("",):
            problems.append(f"split {row.get('split')!r} is not one of {', '.join(SPLITS)} (or empty)")
        if problems:
            bad.append(f"{here}: " + ", ".join(problems))
            continue
        try:
            out.append(_volume(file, row["modality"], row.get("name") or None, row["subject"], split or None,
                               f"{path.name} {here}"))
        except ValueError as err:  # a name that is no plain file name
            bad.append(f"{here}: {err}")
    _refuse(str(path), bad)
    if not out:
        raise ValueError(f"{path}: the manifest lists no volume")
    return out


def expand_volumes(volumes, where: str = "volumes", must_exist: bool = False) -> list[dict]:
    """``data.params.volumes`` (a list of entries, or one string) as checked volume dicts
    (path, h5, modality, name, subject, split, where), in the order given. Refused before
    anything is converted, naming the entries or rows: an unknown modality, a glob without a
    match, a manifest row that is wrong (its file missing too), a repeated name or path, and
    with ``must_exist`` a path entry whose file is missing (FileNotFoundError; else the
    DataModule's prepare_data finds it, before it converts anything)."""
    if isinstance(volumes, (str, Path)):
        volumes = [volumes]
    if volumes is None or len(volumes) == 0:
        raise ValueError("volumes must be a non-empty list of paths or {path, modality, name} mappings, "
                         "a glob or a manifest")
    out = []
    for i, entry in enumerate(volumes):
        here = f"{where}[{i}]"
        if hasattr(entry, "items") and "glob" in entry:
            unknown = set(entry) - set(GLOB_KEYS)
            if unknown:
                raise ValueError(f"{here}: unknown key(s) {sorted(unknown)} of a glob entry; allowed {', '.join(GLOB_KEYS)}")
            out += expand_glob(str(entry["glob"]), entry.get("modality"), entry.get("subject"), here)
        elif isinstance(entry, (str, Path)) and Path(str(entry)).suffix.lower() in MANIFEST_SUFFIXES:
            out += read_manifest(entry, here)
        elif isinstance(entry, str) and is_glob(entry):
            out += expand_glob(entry, where=here)
        else:
            checked = volume_entry(entry, ENTRY_KEYS, where, i)
            if must_exist and not resolve_path(checked["path"]).exists():
                raise FileNotFoundError(f"data.params.{here}: volume not found: {resolve_path(checked['path'])}")
            out.append(parse_volume(checked, i))
    for key in ("name", "path"):
        seen: dict = {}
        for v in out:
            seen.setdefault(v[key], []).append(v["where"])
        repeated = [f"{k} ({', '.join(w)})" for k, w in seen.items() if len(w) > 1]
        if repeated:
            raise ValueError(f"{where}: volume {key}s must be unique, repeated: " + "; ".join(repeated[:MAX_LISTED])
                             + (" (set 'name' per volume)" if key == "name" else ""))
    return out


def volume_paths(volumes) -> list[Path]:
    """The paths of every volume of ``data.params.volumes`` (globs and manifests expanded)."""
    return [v["path"] for v in expand_volumes(volumes)]
