"""Sets a pydantic model's `__dict__` and pydantic's three slots, for hot builders.

Where values are already known valid (a history's load, `add_message`, a page of
sessions), models are built as `model_construct` builds them: a new instance, its
`__dict__`, and the slots `__pydantic_fields_set__`, `__pydantic_extra__` and
`__pydantic_private__`. These are the C setters of those descriptors on BaseModel:
called directly, each skips `object.__setattr__`'s lookup of the name (1,000 messages
built in 0.56 ms instead of 0.70).
"""

from __future__ import annotations

from pydantic import BaseModel

set_dict = vars(BaseModel)["__dict__"].__set__
set_fields_set = vars(BaseModel)["__pydantic_fields_set__"].__set__
set_extra = vars(BaseModel)["__pydantic_extra__"].__set__
set_private = vars(BaseModel)["__pydantic_private__"].__set__
