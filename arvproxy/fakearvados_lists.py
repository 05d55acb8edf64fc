"""
The list API of the fake Arvados API server (L{arvproxy.fakearvados}): C{filters}, C{order},
C{limit}, C{offset}, C{count} and C{select}, as the Rails API server reads and applies them, and
the error the server gives for each mistake.  Pure: records (dicts) in, a page out.

Sources (Arvados 913e363, C{services/api/}):

  - C{lib/load_param.rb}: C{load_limit_offset_order_params} (C{limit} and C{offset} must be
    digits; C{limit} is capped by C{API.MaxItemsPerResponse}; C{order} is a JSON array, a list
    or a comma-separated string of C{"attr [asc|desc]"}, and an entry naming no column of the
    table, or with another direction, is I{silently dropped}), C{optimize_orders} (the default
    orders C{modified_at desc, uuid desc} are appended, stopping at the first unique column),
    C{load_select_param} (an order whose column is not selected is dropped).
  - C{lib/record_filters.rb}: C{record_filters} (each filter C{[attr, operator, operand]};
    which operators and operand types each column type takes; C{!=} and C{not in} match NULL;
    jsonb subproperties C{"attr.key"}; C{"container.<attr>"} on container requests).
  - C{app/models/arvados_model.rb}: C{searchable_columns} (text-only operators such as C{like}
    only on string columns; C{=}, C{<}... also on datetime, integer and boolean columns; never
    on float columns), C{default_orders}, C{unique_columns}.
  - C{app/controllers/application_controller.rb}: C{object_list} (C{items_available} unless
    C{count=none}; C{count} must be C{exact} or C{none}), C{select_for_klass} (an unknown
    attribute in C{select} is an error), C{render_error} (an C{ArgumentError} is a 422 whose
    message is Ruby's C{inspect} of the exception).

Where the fake does less than the server it says so with a 422 naming the fake (filters on
serialized text columns, C{"any"}, expression filters), rather than answering wrongly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Column types, as ActiveRecord reports them.  "serialized" is a text column holding a
# serialized Hash or Array (environment, command, mounts...): searchable by the server, but
# only as YAML/JSON text, which the fake does not imitate.
STRING, TEXT, DATETIME, INTEGER, FLOAT, BOOLEAN, JSONB, SERIALIZED = (
    "string",
    "text",
    "datetime",
    "integer",
    "float",
    "boolean",
    "jsonb",
    "serialized",
)
UNIQUE_COLUMNS = ("id", "uuid")
DEFAULT_ORDERS = ("modified_at desc", "uuid desc")
DEFAULT_LIMIT = 100

# ArvadosModel::kind_class: the UUID infix of each record kind (for "is_a").
KIND_INFIXES = {
    "arvados#apiClientAuthorization": "gj3su",
    "arvados#collection": "4zz18",
    "arvados#container": "dz642",
    "arvados#containerRequest": "xvhdp",
    "arvados#group": "j7d0g",
    "arvados#link": "o0j2j",
    "arvados#user": "tpzed",
}


class APIError(Exception):
    """
    An error answer: C{status}, and the messages of Rails' C{send_error} (C{errors}).

    The fake sends them as the Rails API server does: C{{"errors": [...], "error_token": ...}}.
    """

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__("; ".join(messages))
        self.status = status
        self.messages = list(messages)

    @property
    def message(self) -> str:
        return "; ".join(self.messages)


def argument_error(message: str) -> APIError:
    """Rails' answer to an C{ArgumentError}: 422, the exception's C{inspect}."""
    return APIError(422, f"#<ArgumentError: {message}>")


def ruby_inspect(value: Any) -> str:
    """C{value.inspect} in Ruby (for messages that quote values the way the server does)."""
    if value is None:
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(ruby_inspect(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{ruby_inspect(k)} => {ruby_inspect(v)}" for k, v in value.items())
            + "}"
        )
    return repr(value)


def _ruby_class(value: Any) -> str:
    return {
        type(None): "NilClass",
        bool: "TrueClass" if value else "FalseClass",
        int: "Integer",
        float: "Float",
        str: "String",
        list: "Array",
        dict: "Hash",
    }.get(type(value), type(value).__name__)


def parse_time(value: str) -> datetime:
    """A timestamp operand (Ruby's C{Time.parse}, for the forms clients send) in UTC."""
    text = value.strip()
    match = re.fullmatch(
        r"(\d{4}-\d\d-\d\d)(?:[T ](\d\d:\d\d(?::\d\d)?)(?:\.(\d+))?)?\s*(Z|[+-]\d\d:?\d\d)?", text
    )
    if match is None:
        raise argument_error(f"invalid date: {text!r}")
    day, clock, fraction, zone = match.groups()
    iso = f"{day}T{clock or '00:00:00'}"
    if clock is not None and len(clock) == 5:
        iso += ":00"
    iso += "." + (fraction or "0")[:6].ljust(6, "0")
    iso += "+00:00" if zone in (None, "Z") else zone
    return datetime.fromisoformat(iso).astimezone(UTC)


def _timestamp(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    return parse_time(str(value))


# --- JSON (jsonb) semantics ------------------------------------------------------------------


def jsonb_contains(have: Any, want: Any, top: bool = True) -> bool:
    """PostgreSQL's C{have @> want} for JSON values."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and jsonb_contains(have[k], v, False) for k, v in want.items()
        )
    if isinstance(want, list):
        return isinstance(have, list) and all(
            any(jsonb_contains(h, w, False) for h in have) for w in want
        )
    if isinstance(have, list) and top:
        # A top-level array contains a primitive that is one of its elements.
        return any(h == want and type(h) is type(want) for h in have)
    return have == want and type(have) is type(want)


def _jsonb_text(value: Any) -> str | None:
    """C{col->>key}: a string as itself, NULL as NULL, anything else as its JSON text."""
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _jsonb_path(record_value: Any, path: str) -> tuple[bool, Any]:
    if isinstance(record_value, dict) and path in record_value:
        return True, record_value[path]
    return False, None


def like_matcher(pattern: str, case_insensitive: bool) -> Callable[[str], bool]:
    """SQL C{LIKE}/C{ILIKE} with C{%}, C{_} and C{\\} escapes."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    regex = re.compile("".join(out), re.DOTALL | (re.IGNORECASE if case_insensitive else 0))
    return lambda value: regex.fullmatch(value) is not None


# --- Filters ---------------------------------------------------------------------------------

Row = Mapping[str, Any]
Predicate = Callable[[Row], bool]


@dataclass(frozen=True)
class Table:
    """
    One table of the fake: its name (C{containers}), the class Rails names in messages
    (C{Container}), its UUID infix, its columns' types, its API attributes (what C{select}
    may name) and, for container requests, how to find a row's container (C{joins}).
    """

    name: str
    model: str
    infix: str
    columns: Mapping[str, str]
    attributes: Sequence[str]
    joins: Mapping[str, tuple[Table, Callable[[Row], Row | None]]] | None = None


def _compare(op: str, have: Any, want: Any) -> bool:
    if have is None or want is None:
        return False
    if op == "=":
        return bool(have == want)
    if op == "<>":
        return bool(have != want)
    if op == "<":
        return bool(have < want)
    if op == "<=":
        return bool(have <= want)
    if op == ">":
        return bool(have > want)
    if op == ">=":
        return bool(have >= want)
    raise AssertionError(op)


def _bool_operand(operand: str, attr: str) -> bool:
    lowered = operand.lower()
    if lowered in ("1", "t", "true", "y", "yes"):
        return True
    if lowered in ("0", "f", "false", "n", "no"):
        return False
    raise argument_error(f"Invalid operand '{operand}' for boolean attribute '{attr}'")


def _cast(coltype: str, value: Any) -> Any:
    """What PostgreSQL compares when a text parameter meets a column of C{coltype}."""
    if coltype == DATETIME:
        return _timestamp(value)
    return value


def _scalar_filter(attr: str, coltype: str, operator: str, operand: Any) -> Predicate:
    """record_filters' C{case operator} for a column that is not a jsonb subproperty."""
    get: Callable[[Row], Any]
    if coltype == DATETIME:

        def get(row: Row) -> Any:
            return _timestamp(row.get(attr))
    else:

        def get(row: Row) -> Any:
            return row.get(attr)

    if operator in ("=", "<", "<=", ">", ">=", "!=", "like", "ilike"):
        op = "<>" if operator == "!=" else operator
        if isinstance(operand, str):
            want: Any = operand
            if coltype == BOOLEAN:
                if op not in ("=", "<>"):
                    raise argument_error(f"Invalid operator '{op}' for boolean attribute '{attr}'")
                want = _bool_operand(operand, attr)
            elif coltype == DATETIME and re.search(r"[<=>]", op):
                want = parse_time(operand)
            elif coltype == INTEGER and op not in ("like", "ilike"):
                try:
                    want = int(operand.strip())
                except ValueError:
                    raise APIError(
                        422,
                        f"#<ActiveRecord::StatementInvalid: PG::InvalidTextRepresentation: "
                        f'ERROR:  invalid input syntax for type bigint: "{operand}">',
                    ) from None
            if op in ("like", "ilike"):
                if coltype not in (STRING, TEXT):
                    raise APIError(
                        422,
                        "#<ActiveRecord::StatementInvalid: PG::UndefinedFunction: ERROR:  "
                        f"operator does not exist: {coltype} ~~ unknown>",
                    )
                match = like_matcher(operand, op == "ilike")
                return lambda row: isinstance(row.get(attr), str) and match(row[attr])
            if op == "<>":
                # "explicitly allow NULL"
                return lambda row: get(row) is None or _compare("<>", get(row), want)
            return lambda row: _compare(op, get(row), want)
        if operand is None and op == "=":
            return lambda row: row.get(attr) is None
        if operand is None and op == "<>":
            return lambda row: row.get(attr) is not None
        if coltype == BOOLEAN and op in ("=", "<>") and isinstance(operand, bool):
            return lambda row: _compare(op, get(row), operand)
        if coltype == INTEGER:
            if (
                not isinstance(operand, int)
                or isinstance(operand, bool)
                or operand.bit_length() > 64
            ):
                raise argument_error(f"Invalid operand '{operand}' for integer attribute '{attr}'")
            return lambda row: _compare(op, get(row), operand)
        raise argument_error(
            f"Invalid operand type '{_ruby_class(operand)}' for '{operator}' operator in filters"
        )
    if operator in ("in", "not in"):
        if not isinstance(operand, list):
            raise argument_error(
                f"Invalid operand type '{_ruby_class(operand)}' for '{operator}' operator in "
                "filters"
            )
        if coltype == INTEGER:
            for element in operand:
                if not isinstance(element, int) or isinstance(element, bool):
                    raise argument_error(
                        f"Invalid element '{element}' in array for integer attribute '{attr}'"
                    )
        values = [_cast(coltype, v) for v in operand if v is not None]
        if operator == "in":
            return lambda row: get(row) is not None and get(row) in values
        with_null = None in operand
        return lambda row: get(row) not in values if get(row) is not None else not with_null
    if operator == "is_a":
        kinds = operand if isinstance(operand, list) else [operand]
        infixes = {KIND_INFIXES.get(k) for k in kinds if isinstance(k, str)} - {None}
        return lambda row: isinstance(row.get(attr), str) and row[attr][6:11] in infixes
    if operator == "contains":
        if coltype != JSONB:
            raise argument_error(f"Invalid attribute '{attr}' for '{operator}' operator")
        if operand == []:
            raise argument_error(f"Invalid operand '[]' for '{operator}' operator")
        wanted = operand if isinstance(operand, list) else [operand]
        for element in wanted:
            if not isinstance(element, str):
                raise argument_error(
                    f'Invalid element {ruby_inspect(wanted)} in operand for "contains" '
                    "operator (operand must be a string or array of strings)"
                )

        def contains(row: Row) -> bool:
            have = row.get(attr)
            # jsonb_exists_all: every string is a key of an object, or an element of an array.
            if isinstance(have, (dict, list)):
                return all(w in have for w in wanted)
            return False

        return contains
    raise argument_error(f"Invalid operator '{operator}'")


def _subproperty_filter(attr: str, path: str, operator: str, operand: Any) -> Predicate:
    """record_filters' jsonb search: C{["attr.key", operator, operand]}."""
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]

    def value(row: Row) -> tuple[bool, Any]:
        return _jsonb_path(row.get(attr), path)

    if operator in ("=", "!="):
        negate = operator == "!="

        def equal(row: Row) -> bool:
            if row.get(attr) is None:
                return False  # NULL @> ... is NULL, and so is NOT NULL
            return jsonb_contains(row[attr], {path: operand}) != negate

        return equal
    if operator == "in":
        if not isinstance(operand, list):
            raise argument_error(
                f"Invalid operand type '{_ruby_class(operand)}' for '{operator}' operator in "
                "filters"
            )
        return lambda row: any(jsonb_contains(row.get(attr), {path: o}) for o in operand)
    if operator in ("<", "<=", ">", ">="):

        def compare(row: Row) -> bool:
            found, have = value(row)
            same_kind = isinstance(have, str) == isinstance(operand, str)
            return found and same_kind and _compare(operator, have, operand)

        return compare
    if operator in ("like", "ilike"):
        match = like_matcher(str(operand), operator == "ilike")

        def like(row: Row) -> bool:
            text = _jsonb_text(value(row)[1])
            return text is not None and match(text)

        return like
    if operator == "not in":
        if not isinstance(operand, list):
            raise argument_error(
                f"Invalid operand type '{_ruby_class(operand)}' for '{operator}' operator in "
                "filters"
            )
        texts = [_jsonb_text(o) for o in operand]

        def not_in(row: Row) -> bool:
            text = _jsonb_text(value(row)[1])
            return text is None or text not in texts

        return not_in
    if operator == "exists":
        if operand is True:
            return lambda row: value(row)[0]
        if operand is False:
            return lambda row: not value(row)[0]
        raise argument_error(f"Invalid operand '{operand}' for '{operator}' must be true or false")
    if operator == "contains":
        return lambda row: (
            row.get(attr) is not None
            and (
                jsonb_contains(row[attr], {path: operand})
                or jsonb_contains(row[attr], {path: [operand]})
            )
        )
    raise argument_error(f"Invalid operator for subproperty search '{operator}'")


def _textonly(operator: str) -> bool:
    return not re.search(r"[<=>]", operator) and operator not in ("in", "not in")


def compile_filter(table: Table, f: Any) -> Predicate:
    """
    One filter as a predicate on rows of C{table}.

    @raise APIError: 422 with the server's message, for what the server refuses.
    """
    if not isinstance(f, list):
        raise argument_error(f"Invalid element in filters array: {ruby_inspect(f)} is not an array")
    attrs_in, operator, operand = (list(f) + [None, None, None])[:3]
    if operator == "@@":
        raise argument_error("Full text search operator is no longer supported")
    if not isinstance(operator, str):
        raise argument_error(f"Invalid operator '{operator}' ({_ruby_class(operator)}) in filter")
    operator = operator.lower()
    if attrs_in == "any":
        raise APIError(422, "the fake Arvados API does not implement 'any' filters")
    attrs = attrs_in if isinstance(attrs_in, list) else [attrs_in]
    predicates = [_attribute_filter(table, attr, operator, operand) for attr in attrs]
    return lambda row: any(p(row) for p in predicates)


def _attribute_filter(table: Table, attr: Any, operator: str, operand: Any) -> Predicate:
    if not isinstance(attr, str):
        raise argument_error(f"Invalid attribute '{attr}' in filter")
    parts = attr.split(".", 1)
    target, lookup = table, None
    if len(parts) == 2 and table.joins and parts[0] in table.joins:
        target, lookup = table.joins[parts[0]]
        parts = parts[1].split(".", 1)
    name, path = parts[0], (parts[1] if len(parts) == 2 else None)
    coltype = target.columns.get(name)
    predicate: Predicate
    if path is not None:
        if coltype != JSONB:
            raise argument_error(f"Invalid attribute '{name}' for subproperty filter")
        predicate = _subproperty_filter(name, path, operator, operand)
    elif operator == "exists":
        if coltype != JSONB:
            raise argument_error(f"Invalid attribute '{name}' for operator 'exists' in filter")
        return _on(lookup, lambda row: isinstance(row.get(name), dict) and operand in row[name])
    elif re.fullmatch(r" *\( *(\w+) *(<=?|>=?|=) *(\w+) *\) *", name):
        raise APIError(422, "the fake Arvados API does not implement expression filters")
    else:
        searchable = coltype in (STRING, TEXT, SERIALIZED) or (
            coltype in (DATETIME, INTEGER, BOOLEAN) and not _textonly(operator)
        )
        if not searchable and not (coltype == JSONB and operator in ("contains", "=", "<>", "!=")):
            raise argument_error(f"Invalid attribute '{name}' in filter")
        if coltype == SERIALIZED:
            raise APIError(
                422,
                f"the fake Arvados API does not implement filters on the serialized "
                f"attribute '{name}'",
            )
        if coltype == JSONB and operator != "contains":
            raise APIError(
                422, f"the fake Arvados API does not implement '{operator}' on jsonb '{name}'"
            )
        predicate = _scalar_filter(name, coltype or STRING, operator, operand)
    return _on(lookup, predicate)


def _on(lookup: Callable[[Row], Row | None] | None, predicate: Predicate) -> Predicate:
    if lookup is None:
        return predicate

    def joined(row: Row) -> bool:
        other = lookup(row)
        return other is not None and predicate(other)

    return joined


# --- Parameters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListQuery:
    """What a list call asks for, parsed and checked."""

    predicates: tuple[Predicate, ...]
    orders: tuple[tuple[str, bool], ...]  # (column, descending)
    limit: int
    offset: int
    count: bool
    select: tuple[str, ...] | None


def json_param(params: Mapping[str, Any], key: str, what: str) -> Any:
    """A parameter that clients send as JSON text (or, in a JSON body, as the value itself)."""
    value = params.get(key)
    if isinstance(value, str):
        if value == "":
            return None
        try:
            return json.loads(value)
        except ValueError:
            raise argument_error(f'Could not parse "{key}" param as {what}') from None
    return value


def parse_select(table: Table, params: Mapping[str, Any]) -> tuple[str, ...] | None:
    """C{load_select_param} and C{select_for_klass}."""
    select = json_param(params, "select", "an array")
    if select is None or select is False:
        return None
    if not isinstance(select, list):
        raise argument_error('Could not parse "select" param as an array')
    chosen = []
    for column in select:
        if column == "modified_by_client_uuid":
            continue
        name = str(column)
        if name.startswith(table.name + "."):
            name = name[len(table.name) + 1 :]
        if name not in table.attributes:
            raise argument_error(
                f"Invalid attribute '{column}' of {table.model} in select parameter"
            )
        chosen.append(name)
    return tuple(chosen)


def _digits(params: Mapping[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if not re.fullmatch(r"\d+", text):
        raise argument_error(f"Invalid value for {key} parameter")
    return int(text)


def parse_orders(table: Table, params: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """C{load_limit_offset_order_params}' orders, then C{optimize_orders}."""
    raw = params.get("order")
    entries: list[Any]
    if isinstance(raw, list):
        entries = raw
    elif isinstance(raw, str) and raw.strip():
        if raw.startswith("["):
            parsed = json_param(params, "order", "an array")
            if not isinstance(parsed, list):
                raise argument_error('Could not parse "order" param as an array')
            entries = parsed
        else:
            entries = raw.split(",")
    else:
        entries = []
    given: list[tuple[str, bool]] = []
    for entry in entries:
        words = str(entry).strip().split()
        if not words:
            continue
        attr, direction = words[0], (words[1] if len(words) > 1 else "asc").lower()
        if direction not in ("asc", "desc"):
            continue
        if attr.startswith(table.name + "."):
            attr = attr[len(table.name) + 1 :]
        elif "." in attr:
            raise APIError(
                422, f"the fake Arvados API does not implement ordering by {attr!r} (a join)"
            )
        if re.fullmatch(r"[a-z][_a-z0-9]+", attr) and attr in table.columns:
            given.append((attr, direction == "desc"))
    optimized: list[tuple[str, bool]] = []
    seen = set()
    for attr, descending in [
        *given,
        *((d.split()[0], d.split()[1] == "desc") for d in DEFAULT_ORDERS),
    ]:
        if attr in seen:
            continue
        seen.add(attr)
        optimized.append((attr, descending))
        if attr in UNIQUE_COLUMNS:
            break
    return optimized


def parse_list(table: Table, params: Mapping[str, Any], max_items: int) -> ListQuery:
    """Every list parameter of C{params}, checked as the server checks them."""
    limit = _digits(params, "limit")
    limit = DEFAULT_LIMIT if limit is None else min(limit, max_items)
    offset = _digits(params, "offset") or 0
    orders = parse_orders(table, params)
    filters = json_param(params, "filters", "an array")
    if filters is None:
        filters = []
    if not isinstance(filters, list):
        raise argument_error('Could not parse "filters" param as an array')
    predicates = tuple(compile_filter(table, f) for f in filters)
    if json_param(params, "where", "an object"):
        raise APIError(422, "the fake Arvados API does not implement 'where' (use filters)")
    select = parse_select(table, params)
    if select is not None:
        orders = [(attr, d) for attr, d in orders if attr in select]
    count = params.get("count")
    if count not in (None, "", "exact", "none"):
        raise argument_error("count parameter must be 'exact' or 'none'")
    return ListQuery(predicates, tuple(orders), limit, offset, count != "none", select)


# --- Running a query -------------------------------------------------------------------------


def _sort_key(coltype: str, value: Any) -> Any:
    if coltype == DATETIME:
        return _timestamp(value)
    if coltype in (JSONB, SERIALIZED):
        return json.dumps(value, sort_keys=True)
    return value


def run_list(table: Table, rows: Iterable[Row], query: ListQuery) -> tuple[list[Row], int]:
    """
    The rows C{query} selects, in its order, and the page C{offset}/C{limit} asks for.

    @return: the page and C{items_available} (the count before paging).
    """
    matched = [row for row in rows if all(p(row) for p in query.predicates)]
    for attr, descending in reversed(query.orders):
        coltype = table.columns.get(attr, STRING)
        present = [r for r in matched if r.get(attr) is not None]
        absent = [r for r in matched if r.get(attr) is None]
        present.sort(key=lambda r: _sort_key(coltype, r[attr]), reverse=descending)
        # PostgreSQL: NULLS LAST when ascending, NULLS FIRST when descending.
        matched = absent + present if descending else present + absent
    return matched[query.offset : query.offset + query.limit], len(matched)


def rendered(table: Table, row: Row, select: Sequence[str] | None) -> dict[str, Any]:
    """A row as the API shows it: its API attributes (only the selected ones with C{select})."""
    names = table.attributes if select is None else ["kind", *select]
    return {name: row.get(name) for name in names if name in table.attributes}
