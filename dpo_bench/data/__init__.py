"""Preference data: schema, loading, validation and fingerprints.

Every method in the benchmark consumes one preference dataset; this package turns a file, a
``save_to_disk`` directory or a hub id into a validated :class:`PreferenceData` whose fingerprint
goes into every report. Five row formats are understood (the ones TRL defines):

=================  ==========================================================================
``standard``       ``prompt``, ``chosen``, ``rejected`` strings; completions exclude the prompt
``implicit``       only ``chosen`` / ``rejected`` full texts; the prompt is their common prefix,
                   cut at a word boundary (stored split into the three standard columns)
``conversational`` ``prompt`` / ``chosen`` / ``rejected`` are lists of ``{"role", "content"}``
                   messages; :func:`render_conversational` turns them into strings
``implicit_conversational``
                   only ``chosen`` / ``rejected`` message lists holding the whole conversation;
                   the prompt is their shared leading messages, the completions the differing
                   tails (stored split into the three conversational columns)
``rankings``       ``prompt`` and ``ranking``: K >= 2 completions, best first;
                   :func:`rankings_to_pairs` turns them into standard pairs
=================  ==========================================================================

Every problem is a :class:`DataValidationError` naming the source, the 0-based row and the field,
e.g. ``prefs.jsonl: row 12, field 'chosen': empty string``. With ``on_bad_rows="error"`` the
first bad row (in row order) is raised before anything else happens; with ``"skip"`` bad rows
are dropped, counted and kept as ``PreferenceData.problems``.

Messages have the roles system, user, assistant and tool; an assistant message may carry
``tool_calls`` (``[{"type": "function", "function": {"name", "arguments"}}]``, as transformers'
chat templates read them) instead of content, and a tool message a ``name`` or ``tool_call_id``.

A folder is a ``save_to_disk`` directory when it holds ``dataset_info.json``, ``state.json`` or
``dataset_dict.json``; otherwise its ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` shards (one
type) are read in name order as one dataset, and errors name the shard and its own row. A glob
(``data/train-*.jsonl``) is read the same way. A hub id goes to ``datasets.load_dataset`` with the
configuration name, revision and data files of :class:`HubOptions`, streamed when only the first
rows are wanted.

Local files are parsed here rather than by ``datasets``' json and csv builders: those fail a whole
file on its first malformed line with an Arrow error that names no row, where these readers name the
file, row and field of each bad row and can skip it (``on_bad_rows="skip"``); see docs/data.md.

Nothing in a dataset is ever executed: local files are parsed here (json, csv, parquet, arrow),
never unpickled, and ``trust_remote_code`` reaches ``datasets.load_dataset`` only when the caller
passes ``trust_remote_code=True``.

The modules, bottom up: :mod:`.errors` (the errors, one line each), :mod:`.rows` (a row's values
and the formats), :mod:`.validation` (a frame of rows into the standard columns), :mod:`.reading`
(files, shards, saved and hub datasets as rows) and :mod:`.dataset` (the validated dataset, its
fingerprint, conversions, writing and ``check-data``).
"""

from .dataset import (
    PAIR_MODES, PreferenceData, check_data, check_lengths, fingerprint_frame, load_preferences, rankings_to_pairs,
    render_conversational, write_preferences,
)
from .errors import LOCAL_SUFFIXES, DataValidationError, DataValidationErrors, HubUnreachableError, hub_offline, unreachable
from .reading import HubOptions, glob_matches, local_source_exists, looks_like_path, read_table
from .rows import CHAT_FORMATS, FORMATS, ROLES, detect_format
from .validation import BAD_ROW_POLICIES, validate_frame

__all__ = [
    "BAD_ROW_POLICIES",
    "CHAT_FORMATS",
    "DataValidationError",
    "DataValidationErrors",
    "FORMATS",
    "HubOptions",
    "HubUnreachableError",
    "LOCAL_SUFFIXES",
    "PAIR_MODES",
    "PreferenceData",
    "ROLES",
    "check_data",
    "check_lengths",
    "detect_format",
    "fingerprint_frame",
    "glob_matches",
    "hub_offline",
    "load_preferences",
    "local_source_exists",
    "looks_like_path",
    "rankings_to_pairs",
    "read_table",
    "render_conversational",
    "unreachable",
    "validate_frame",
    "write_preferences",
]
