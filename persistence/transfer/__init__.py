"""Moving data: migrate and verify between stores, export/import, backup/restore.

The public functions of API.md "Moving data", gathered from their modules:
`migration` (batches, migrate_storage), `verification`, `exchange` and
`exchange_format` (the JSON file), `backups`, `files` (atomic writes), and
`unfinished` (a copy into a store begun and not finished, noted there).
"""

from __future__ import annotations

from persistence.transfer.backups import backup_storage, restore_backup, validate_backup_file
from persistence.transfer.exchange import (
    export_to_json,
    export_to_stream,
    import_from_json,
    import_from_stream,
    validate_export_file,
)
from persistence.transfer.exchange_format import FORMAT_NAME, FORMAT_VERSION
from persistence.transfer.migration import DEFAULT_BATCH_SIZE, ProgressCallback, migrate_storage
from persistence.transfer.unfinished import UnfinishedCopy, unfinished_copies
from persistence.transfer.verification import verify_migration

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ProgressCallback",
    "UnfinishedCopy",
    "backup_storage",
    "export_to_json",
    "export_to_stream",
    "import_from_json",
    "import_from_stream",
    "migrate_storage",
    "restore_backup",
    "unfinished_copies",
    "validate_backup_file",
    "validate_export_file",
    "verify_migration",
]
