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


def input_error(err: BaseException | None) -> DeliftInputError | None:
    """The DeliftInputError behind `err`, if any (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DeliftInputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def exit_status(err: BaseException) -> int:
    """The command's exit status for a job that raised `err`: 2 for bad input (one `delift: error:`
    line), the SystemExit's own code, else 1."""
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else 1
    return 2 if input_error(err) is not None else 1
