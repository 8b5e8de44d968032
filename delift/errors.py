"""One exception type for user-facing input problems.

`run.py` turns a DeliftInputError into a single error line and a non-zero exit, so every message
must name where the problem is: the file, the record (line number or id) and the field or key.
"""


class DeliftInputError(ValueError):
    """Bad user input (data file, record, config value, cache file)."""

    def __init__(self, message: str, *, file=None, record=None, field=None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        self.file, self.record, self.field = file, record, field
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
