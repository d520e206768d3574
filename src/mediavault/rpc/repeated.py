"""A repeated field of a request handed to the domain as the values it stands for, each made when read."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, overload

Item = TypeVar("Item")
Value = TypeVar("Value")


class Converted(Sequence[Value], Generic[Item, Value]):
    """The items of a repeated field as domain values, converted one by one as the domain reads them.

    A request can carry millions of items where the domain takes a few hundred: the domain
    refuses such a list by its length, so that none of its values is ever made.
    """

    def __init__(self, items: Sequence[Item], convert: Callable[[Item], Value]) -> None:
        self._items = items
        self._convert = convert

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Value: ...

    @overload
    def __getitem__(self, index: slice) -> Converted[Item, Value]: ...

    def __getitem__(self, index: int | slice) -> Value | Converted[Item, Value]:
        if isinstance(index, slice):
            return Converted(self._items[index], self._convert)
        return self._convert(self._items[index])

    def __iter__(self) -> Iterator[Value]:
        return map(self._convert, self._items)
