"""JSON as the files a merge reads hold it, whoever wrote them: a document nested deeper than
Python's recursion allows (`[[[[...]]]]` a few thousand times over, in a header, an index, a
config or a tokenizer file) is a ValueError like any other malformed JSON, so that each reader's
one-line error names the file, not a RecursionError traceback."""

import json


def loads(text, **kwargs):
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read (over Python's recursion limit)") \
            from None
