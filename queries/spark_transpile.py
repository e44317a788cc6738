"""DuckDB macros to Spark SQL: expand the macros of queries/*.sql into a query, then transpile.

The macro files stay the single source of every analysis. A `CREATE MACRO` statement
is split into its header (name, parameters, defaults; sqlglot does not parse DuckDB's
`k := 20` defaults) and its body, which sqlglot parses in the DuckDB dialect. A call of
a table macro in a query becomes a subquery of the body, a scalar macro call becomes
the body's expression, with each parameter replaced by its argument, exactly as DuckDB
substitutes them (an unqualified name equal to a parameter IS the parameter). The
expanded tree is then rewritten where sqlglot's DuckDB-to-Spark output would differ
in meaning, and generated in the Spark dialect.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.optimizer.simplify import simplify
from sqlglot.tokens import TokenType

from warehouse.errors import QueryError

MAX_DEPTH = 32  # macros calling macros; deeper means a macro calls itself


class WrittenDuckDB(DuckDB):
    """DuckDB, with list indexes kept as written (1-based): sqlglot shifts some to 0-based at parse time
    (literals) and not others (columns), so spark_fixes rewrites them all itself."""

    INDEX_OFFSET = 0


@dataclass(frozen=True)
class Macro:
    name: str
    params: tuple[str, ...]
    defaults: dict[str, exp.Expression]
    body: exp.Expression
    is_table: bool
    source: str


def _statements(sql: str):
    """The token lists of `sql`'s statements (split at semicolons outside strings)."""
    statement = []
    for token in WrittenDuckDB().tokenize(sql):
        if token.token_type == TokenType.SEMICOLON:
            if statement:
                yield statement
            statement = []
        else:
            statement.append(token)
    if statement:
        yield statement


def _split_params(tokens) -> list[list]:
    params, current, depth = [], [], 0
    for token in tokens:
        if token.token_type in (TokenType.L_PAREN, TokenType.L_BRACKET, TokenType.L_BRACE):
            depth += 1
        elif token.token_type in (TokenType.R_PAREN, TokenType.R_BRACKET, TokenType.R_BRACE):
            depth -= 1
        if token.token_type == TokenType.COMMA and depth == 0:
            params.append(current)
            current = []
        else:
            current.append(token)
    if current:
        params.append(current)
    return params


def _parse_macro(sql: str, tokens, source: str) -> Macro | None:
    """A Macro from a `CREATE [OR REPLACE] [TEMP] MACRO|FUNCTION name(params) AS [TABLE] body` statement."""
    kinds = [t.token_type for t in tokens]
    if kinds[:1] != [TokenType.CREATE] or TokenType.FUNCTION not in kinds[:5]:
        return None
    i = kinds.index(TokenType.FUNCTION) + 1
    while kinds[i + 1] == TokenType.DOT:  # schema-qualified name: keep the last part
        i += 2
    name = tokens[i].text.lower()
    where = f"{source}: macro {name}"
    if kinds[i + 1] != TokenType.L_PAREN:
        raise QueryError(f"{where}: expected '(' after the name")
    depth, j = 0, i + 1
    for j in range(i + 1, len(tokens)):
        depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(kinds[j], 0)
        if depth == 0:
            break
    params, defaults = [], {}
    for param in _split_params(tokens[i + 2 : j]):
        pname = param[0].text.lower()
        if len(param) == 1:
            params.append(pname)
        elif param[1].token_type == TokenType.COLON_EQ and len(param) > 2:
            params.append(pname)
            defaults[pname] = sqlglot.parse_one(sql[param[2].start : param[-1].end + 1], read=WrittenDuckDB)
        else:
            raise QueryError(
                f"{where}: parameter {pname!r} is neither `name` nor `name := default`; the Spark engine reads only those"
            )
    rest = tokens[j + 1 :]
    if not rest or rest[0].token_type != TokenType.ALIAS:
        raise QueryError(f"{where}: expected AS after the parameters")
    is_table = len(rest) > 1 and rest[1].token_type == TokenType.TABLE
    body_tokens = rest[2:] if is_table else rest[1:]
    if not body_tokens:
        raise QueryError(f"{where}: empty body")
    body_sql = sql[body_tokens[0].start : body_tokens[-1].end + 1]
    try:
        body = sqlglot.parse_one(body_sql, read=WrittenDuckDB)
    except sqlglot.errors.ParseError as err:
        raise QueryError(
            f"{where}: sqlglot cannot parse the body ({str(err).splitlines()[0]}); use standard SQL there"
        ) from None
    return Macro(name, tuple(params), defaults, body, is_table, source)


def load_macros(paths) -> dict[str, Macro]:
    """Every macro of the given .sql files, by lower-case name (a later file replaces an earlier one)."""
    found: dict[str, Macro] = {}
    for path in paths:
        path = Path(path)
        found.update(_file_macros(str(path), path.stat().st_mtime_ns))
    return found


@functools.lru_cache(maxsize=64)
def _file_macros(path: str, _mtime_ns: int) -> dict[str, Macro]:
    sql = Path(path).read_text()
    macros = {}
    for tokens in _statements(sql):
        macro = _parse_macro(sql, tokens, Path(path).name)
        if macro is not None:
            macros[macro.name] = macro
    return macros


# -- expansion -----------------------------------------------------------------


def _bind(macro: Macro, call: exp.Func) -> dict[str, exp.Expression]:
    """Parameter name -> argument expression, DuckDB's rules: positional first, then `name := value`."""
    positional, named = [], {}
    for arg in call.expressions:
        if isinstance(arg, (exp.PropertyEQ, exp.Kwarg)):  # name := value
            named[arg.this.name.lower()] = arg.expression
        elif named:
            raise QueryError(f"{macro.name}(): positional argument after a named one")
        else:
            positional.append(arg)
    if len(positional) > len(macro.params):
        raise QueryError(
            f"{macro.name}() takes {len(macro.params)} arguments ({', '.join(macro.params)}), got {len(positional)}"
        )
    bound = dict(zip(macro.params, positional))
    for name, value in named.items():
        if name not in macro.params:
            raise QueryError(f"{macro.name}() has no parameter {name!r}; its parameters are {', '.join(macro.params)}")
        bound[name] = value
    for name in macro.params:
        if name not in bound:
            if name not in macro.defaults:
                raise QueryError(f"{macro.name}() needs the argument {name!r} (parameters: {', '.join(macro.params)})")
            bound[name] = macro.defaults[name]
    return bound


def _substitute(body: exp.Expression, bound: dict[str, exp.Expression]) -> exp.Expression:
    def replace(node):
        if isinstance(node, exp.Column) and not node.table and node.name.lower() in bound:
            value = bound[node.name.lower()].copy()
            simple = isinstance(
                value, (exp.Literal, exp.Column, exp.Paren, exp.Subquery, exp.Null, exp.Boolean, exp.Func)
            )
            return value if simple else exp.Paren(this=value)
        return node

    return body.copy().transform(replace)


def _macro_name(node: exp.Expression) -> str | None:
    return node.name.lower() if isinstance(node, exp.Anonymous) else None


def _rename_ctes(body: exp.Expression, suffix: str) -> exp.Expression:
    """Give the body's CTEs names of their own: sqlglot hoists nested CTEs into one WITH for
    Spark, where two expansions of one macro would otherwise define the same name twice."""
    names = {cte.alias for cte in body.find_all(exp.CTE)}
    if not names:
        return body
    for cte in body.find_all(exp.CTE):
        cte.set("alias", exp.TableAlias(this=exp.to_identifier(f"{cte.alias}{suffix}")))
    for table in body.find_all(exp.Table):
        if not table.db and isinstance(table.this, exp.Identifier) and table.name in names:
            if not table.alias:
                table.set("alias", exp.TableAlias(this=exp.to_identifier(table.name)))
            table.set("this", exp.to_identifier(f"{table.name}{suffix}"))
    return body


def expand(tree: exp.Expression, macros: dict[str, Macro]) -> exp.Expression:
    """`tree` with every macro call replaced by the macro's body (recursively)."""
    expansions = iter(range(1, 1_000_000))

    def body_of(macro: Macro, call: exp.Func, depth: int) -> exp.Expression:
        body = _rename_ctes(_substitute(macro.body, _bind(macro, call)), f"__{macro.name}{next(expansions)}")
        return walk(body, depth + 1)

    def walk(node: exp.Expression, depth: int) -> exp.Expression:
        if depth > MAX_DEPTH:
            raise QueryError(f"macros nest deeper than {MAX_DEPTH} levels: does a macro call itself?")
        return node.transform(lambda n: replace(n, depth))

    def replace(node, depth):
        if isinstance(node, exp.Table) and _macro_name(node.this) in macros:
            macro = macros[_macro_name(node.this)]
            if not macro.is_table:
                raise QueryError(f"{macro.name} is a scalar macro: call it in an expression, not in FROM")
            alias = node.args.get("alias") or exp.TableAlias(this=exp.to_identifier(macro.name))
            return exp.Subquery(this=body_of(macro, node.this, depth), alias=alias.copy())
        name = _macro_name(node)
        if name in macros and not isinstance(node.parent, exp.Table):
            macro = macros[name]
            if macro.is_table:
                raise QueryError(f"{macro.name} is a table macro: use it in FROM, e.g. SELECT * FROM {macro.name}(...)")
            body = body_of(macro, node, depth)
            return (
                body if isinstance(body, (exp.Subquery, exp.Paren, exp.Literal, exp.Column)) else exp.Paren(this=body)
            )
        return node

    return walk(tree, 0)


# -- DuckDB meaning, Spark spelling ------------------------------------------------


def _spark(template: str, **args: exp.Expression) -> exp.Expression:
    """A Spark SQL expression from `template`, its upper-case placeholder columns replaced by `args`."""
    tree = sqlglot.parse_one(template, read="spark")
    return tree.transform(lambda n: args[n.name].copy() if isinstance(n, exp.Column) and n.name in args else n)


def _dot(a, b):
    return _spark(
        "aggregate(zip_with(A, B, (_whq_x, _whq_y) -> _whq_x * _whq_y), CAST(0 AS DOUBLE), (_whq_s, _whq_v) -> _whq_s + _whq_v)",
        A=a,
        B=b,
    )


def _list_sum(a):
    # DuckDB sums the non-NULL elements and gives NULL for an empty list
    return _spark(
        "aggregate(A, CAST(NULL AS DOUBLE), (_whq_s, _whq_v) -> CASE WHEN _whq_v IS NULL THEN _whq_s ELSE coalesce(_whq_s, 0) + _whq_v END)",
        A=a,
    )


def _non_null_count(a):
    return _spark("size(filter(A, _whq_v -> _whq_v IS NOT NULL))", A=a)


# DuckDB list functions sqlglot passes through by name, as Spark expressions of their arguments.
_LIST_FUNCTIONS = {
    "error": lambda msg: _spark("raise_error(M)", M=msg),
    "list_dot_product": _dot,
    "list_inner_product": _dot,
    "array_dot_product": _dot,
    "array_inner_product": _dot,
    "list_cosine_similarity": lambda a, b: _spark(
        "D / (sqrt(AA) * sqrt(BB))", D=_dot(a, b), AA=_dot(a, a), BB=_dot(b, b)
    ),
    "array_cosine_similarity": lambda a, b: _spark(
        "D / (sqrt(AA) * sqrt(BB))", D=_dot(a, b), AA=_dot(a, a), BB=_dot(b, b)
    ),
    "list_sum": _list_sum,
    "list_avg": lambda a: _spark("S / N", S=_list_sum(a), N=_non_null_count(a)),
    "list_count": _non_null_count,
    "list_intersect": lambda a, b: _spark("array_intersect(A, B)", A=a, B=b),
    "array_intersect": lambda a, b: _spark("array_intersect(A, B)", A=a, B=b),
    "list_has_all": lambda a, b: _spark("size(array_except(B, A)) = 0", A=a, B=b),
    "list_reverse": lambda a: _spark("reverse(A)", A=a),
    "array_reverse": lambda a: _spark("reverse(A)", A=a),
    "list_extract": lambda a, i: _spark("try_element_at(A, I)", A=a, I=i),
    "list_element": lambda a, i: _spark("try_element_at(A, I)", A=a, I=i),
    "list_slice": lambda a, lo, hi: _slice(a, lo, hi),
    "strlen": lambda a: _spark("length(A)", A=a),
}

# Functions whose result is a list (for telling DuckDB's len(list) from len(string)).
_LIST_NODES = (
    exp.Array,
    exp.ArrayAgg,
    exp.Transform,
    exp.ArrayFilter,
    exp.ArraySort,
    exp.ArrayDistinct,
    exp.ArrayConcat,
    exp.Flatten,
    exp.GenerateSeries,
    exp.Split,
    exp.RegexpSplit,
    exp.ArrayIntersect,
)
_LIST_ANONYMOUS = {
    "list_intersect",
    "array_intersect",
    "list_reverse",
    "array_reverse",
    "list_slice",
    "list_distinct",
    "generate_series",
    "range",
}


_BITWISE = (exp.BitwiseXor, exp.BitwiseAnd, exp.BitwiseOr, exp.BitwiseLeftShift, exp.BitwiseRightShift)


def _slice(a, lo, hi):
    """DuckDB a[lo:hi] (1-based, both ends included) as Spark slice(a, start, length)."""
    if any(isinstance(bound, exp.Neg) for bound in (lo, hi)):
        raise QueryError(
            "a list slice with a negative bound has no Spark equivalent: use positive bounds (e.g. len(x) - 1)"
        )
    lo = lo or exp.Literal.number(1)
    hi = hi or _spark("size(A)", A=a)
    return _spark("slice(A, LO, HI - LO + 1)", A=a, LO=lo, HI=hi)


def _list_columns(tree: exp.Expression) -> set[str]:
    """Names that hold lists: the list columns of schema.sql, and every alias of a list expression in the query."""
    from warehouse import schema

    names = {c.name for t in schema.tables().values() for c in t.columns if c.type.endswith("[]")}
    while True:
        found = {a.alias for a in tree.find_all(exp.Alias) if a.alias and _is_list(a.this, names)} - names
        if not found:
            return names
        names |= found


def _is_list(node: exp.Expression, names: set[str]) -> bool:
    if isinstance(node, (exp.Paren, exp.Coalesce)):
        return _is_list(node.this, names)
    if isinstance(node, exp.Cast):
        return node.to.is_type(exp.DataType.Type.ARRAY)
    if isinstance(node, exp.Column):
        return node.name in names
    if isinstance(node, exp.Bracket):
        return any(isinstance(e, exp.Slice) for e in node.expressions)
    if isinstance(node, exp.Anonymous):
        return node.name.lower() in _LIST_ANONYMOUS
    return isinstance(node, _LIST_NODES)


def _ordered_list(agg: exp.ArrayAgg) -> exp.Expression:
    """DuckDB list(v ORDER BY k...) as Spark: sort the collected (k..., v) structs, keep v (collect_list alone has no order)."""
    order: exp.Order = agg.this
    keys = order.expressions
    struct = _spark(
        "named_struct(" + ", ".join(f"'k{i}', K{i}" for i in range(len(keys))) + ", 'v', V)",
        V=order.this,
        **{f"K{i}": k.this for i, k in enumerate(keys)},
    )
    whens = []
    for i, key in enumerate(keys):
        first, desc = bool(key.args.get("nulls_first")), bool(key.args.get("desc"))
        whens += [
            f"WHEN _whq_l.k{i} IS NULL AND _whq_r.k{i} IS NOT NULL THEN {-1 if first else 1}",
            f"WHEN _whq_l.k{i} IS NOT NULL AND _whq_r.k{i} IS NULL THEN {1 if first else -1}",
            f"WHEN _whq_l.k{i} < _whq_r.k{i} THEN {1 if desc else -1}",
            f"WHEN _whq_l.k{i} > _whq_r.k{i} THEN {-1 if desc else 1}",
        ]
    return _spark(
        f"transform(array_sort(collect_list(S), (_whq_l, _whq_r) -> CASE {' '.join(whens)} ELSE 0 END), _whq_e -> _whq_e.v)",
        S=struct,
    )


def _one_generator(select: exp.Select) -> None:
    """Spark allows one generator per SELECT: DuckDB's unnest(l) next to generate_subscripts(l, 1) becomes one posexplode."""
    generators = [
        node
        for projection in select.expressions
        for node in projection.find_all(exp.Explode, exp.Anonymous)
        if (isinstance(node, exp.Explode) or node.name.lower() == "generate_subscripts")
        and node.parent_select is select
    ]
    if len(generators) < 2 and not any(isinstance(g, exp.Anonymous) for g in generators):
        return
    lists = {(g.this if isinstance(g, exp.Explode) else g.expressions[0]).sql() for g in generators}
    if len(lists) > 1:
        raise QueryError(
            "Spark allows one generator per SELECT: unnest several lists in separate subqueries (or zip them first)"
        )
    source = generators[0].this if isinstance(generators[0], exp.Explode) else generators[0].expressions[0]
    lateral = sqlglot.parse_one(
        "SELECT 1 FROM t LATERAL VIEW POSEXPLODE(L) _whq_u AS _whq_pos, _whq_val", read="spark"
    ).args["laterals"][0]
    lateral.this.set("this", source.copy())
    for generator in generators:
        if isinstance(generator, exp.Explode):
            generator.replace(exp.column("_whq_val", table="_whq_u"))
        else:
            generator.replace(_spark("(_whq_u._whq_pos + 1)"))
    select.append("laterals", lateral)


def _inline_windows(select: exp.Select) -> None:
    """Spark reads `OVER w` but not `OVER (w ROWS ...)`: write every named window out in full."""
    named = {w.name: w for w in select.args.get("windows") or []}
    if not named:
        return
    for window in select.find_all(exp.Window):
        definition = named.get(window.alias) if window.parent_select is select and window.args.get("over") else None
        if definition is None:
            continue
        for key in ("partition_by", "order", "spec"):
            if not window.args.get(key) and definition.args.get(key):
                window.set(
                    key,
                    definition.args[key].copy() if key != "partition_by" else [p.copy() for p in definition.args[key]],
                )
        window.set("alias", None)
    select.set("windows", None)


def _qualify_as_where(select: exp.Select) -> exp.Expression:
    """DuckDB's QUALIFY as a filter on a subquery, with ORDER BY / LIMIT kept outside it
    (sqlglot's own rewrite leaves them inside, so LIMIT would cut before the filter)."""
    condition = select.args["qualify"].pop().this
    if select.args.get("distinct"):
        raise QueryError(
            "SELECT DISTINCT ... QUALIFY has no Spark equivalent: filter in a subquery, then take DISTINCT"
        )
    aliases = {p.alias: p.this for p in select.expressions if isinstance(p, exp.Alias)}
    condition = condition.transform(
        lambda n: aliases[n.name].copy() if isinstance(n, exp.Column) and not n.table and n.name in aliases else n
    )
    hidden = ["_whq_keep"]
    select.select(exp.alias_(condition, "_whq_keep"), copy=False)
    order, limit, offset = (select.args.get(k) for k in ("order", "limit", "offset"))
    for key in ("order", "limit", "offset"):
        select.set(key, None)
    names = [p.alias_or_name for p in select.expressions]
    if order:
        for i, ordered in enumerate(order.expressions):
            key = ordered.this
            if isinstance(key, exp.Literal) and not key.is_string:
                key = select.expressions[int(key.this) - 1]
            if isinstance(key, exp.Column) and not key.table and key.name in names:
                ordered.set("this", exp.column(key.name))
            else:
                hidden.append(f"_whq_o{i}")
                select.select(exp.alias_(key.copy(), hidden[-1]), copy=False)
                ordered.set("this", exp.column(hidden[-1]))
    outer = sqlglot.parse_one(f"SELECT * EXCEPT ({', '.join(hidden)}) FROM q AS _whq_q WHERE _whq_keep", read="spark")
    outer.find(exp.Table).replace(
        exp.Subquery(this=select.copy(), alias=exp.TableAlias(this=exp.to_identifier("_whq_q")))
    )
    for key, value in (("order", order), ("limit", limit), ("offset", offset)):
        if value:
            outer.set(key, value)
    return outer


# -- One rewrite per construct, in the style of sqlglot's transforms.py: each takes a node of the expanded
# tree (children already rewritten) and returns its Spark spelling, or the node itself when it does not apply.


def _lambda_index_from_one(node: exp.Expression) -> exp.Expression:
    """DuckDB's lambda index (`(x, i) -> ...` in list_transform / list_filter) counts from 1, Spark's from 0:
    every use of the index in the body becomes (i + 1)."""
    if not (
        isinstance(node, exp.Lambda)
        and len(node.expressions) == 2
        and isinstance(node.parent, (exp.Transform, exp.ArrayFilter))
    ):
        return node
    index = node.expressions[1].name
    node.set(
        "this",
        node.this.transform(
            lambda n: (
                exp.Paren(this=exp.Add(this=n.copy(), expression=exp.Literal.number(1)))
                if isinstance(n, (exp.Identifier, exp.Column))
                and n.name == index
                and not isinstance(n.parent, exp.Column)
                else n
            )
        ),
    )
    return node


def _list_function(node: exp.Expression) -> exp.Expression:
    """A DuckDB list function sqlglot passes through by name (`_LIST_FUNCTIONS`) as its Spark expression."""
    if isinstance(node, exp.Anonymous) and node.name.lower() in _LIST_FUNCTIONS:
        return _LIST_FUNCTIONS[node.name.lower()](*node.expressions)
    return node


def _list_slice(node: exp.Expression) -> exp.Expression:
    """DuckDB's a[lo:hi] (1-based, both ends included) as Spark's slice()."""
    if isinstance(node, exp.Bracket) and len(node.expressions) == 1 and isinstance(node.expressions[0], exp.Slice):
        index = node.expressions[0]
        return _slice(node.this, index.this, index.expression)
    return node


def _list_element(node: exp.Expression) -> exp.Expression:
    """DuckDB's a[i] (1-based, negative from the end, NULL out of range) as Spark's try_element_at, which
    follows the same rules; a string key (a struct field) stays as it is."""
    if not (isinstance(node, exp.Bracket) and len(node.expressions) == 1):
        return node
    index = node.expressions[0]
    if isinstance(index, exp.Slice) or (isinstance(index, exp.Literal) and index.is_string):
        return node
    return _spark("try_element_at(A, I)", A=node.this, I=index)


def _list_length(node: exp.Expression, list_names: set[str]) -> exp.Expression:
    """DuckDB's len() of a list (a list column, or an expression that gives one) as Spark's size()."""
    if isinstance(node, exp.Length) and _is_list(node.this, list_names):
        return exp.ArraySize(this=node.this)
    return node


def _bitwise_parentheses(node: exp.Expression) -> exp.Expression:
    """Parentheses around a bitwise operation inside another operation: sqlglot drops them, and Spark binds
    * before ^ & |, so without them the meaning changes."""
    if isinstance(node, _BITWISE) and isinstance(node.parent, (exp.Binary, exp.Unary)):
        return exp.Paren(this=node)
    return node


def _log_base_ten(node: exp.Expression) -> exp.Expression:
    """DuckDB's one-argument log(x) is base 10; Spark's is the natural logarithm."""
    if isinstance(node, exp.Log) and not node.expression:
        return exp.Log(this=exp.Literal.number(10), expression=node.this)
    return node


def _exact_percentile(node: exp.Expression) -> exp.Expression:
    """DuckDB's quantile_cont(x, q) (exact, interpolated) as Spark's percentile(x, q), not an approximation."""
    if (
        isinstance(node, exp.PercentileCont)
        and node.expression is not None
        and not isinstance(node.parent, exp.WithinGroup)
    ):
        return _spark("percentile(X, Q)", X=node.this, Q=node.expression)
    return node


def _ordered_list_aggregate(node: exp.Expression) -> exp.Expression:
    """DuckDB's list(v ORDER BY k) keeps the order; Spark's collect_list has none (see `_ordered_list`)."""
    if isinstance(node, exp.ArrayAgg) and isinstance(node.this, exp.Order):
        return _ordered_list(node)
    return node


def _range_table(node: exp.Expression) -> exp.Expression:
    """DuckDB's table function generate_series(start, end) includes its end; Spark's range(start, end) does not."""
    if not (isinstance(node, exp.Table) and isinstance(node.this, exp.GenerateSeries)):
        return node
    series = node.this
    end = (
        series.args["end"]
        if series.args.get("is_end_exclusive")
        else exp.Add(this=series.args["end"], expression=exp.Literal.number(1))
    )
    args = [series.args["start"], end] + ([series.args["step"]] if series.args.get("step") else [])
    return exp.Table(this=exp.Anonymous(this="range", expressions=args), alias=node.args.get("alias"))


def spark_fixes(tree: exp.Expression) -> exp.Expression:
    """Rewrite the constructs whose sqlglot Spark output would not mean what DuckDB means."""
    list_names = _list_columns(tree)
    for select in list(tree.find_all(exp.Select)):
        _one_generator(select)
        _inline_windows(select)
        if select.args.get("qualify"):
            outer = _qualify_as_where(select)
            if select is tree:
                tree = outer
            else:
                select.replace(outer)

    rewrites = (
        _lambda_index_from_one,
        _list_function,
        _list_slice,
        _list_element,
        functools.partial(_list_length, list_names=list_names),
        _bitwise_parentheses,
        _log_base_ten,
        _exact_percentile,
        _ordered_list_aggregate,
        _range_table,
    )

    def fix(node):
        """The node as the first of `rewrites` that changes it gives it (the node itself when none does)."""
        for rewrite in rewrites:
            new = rewrite(node)
            if new is not node:
                return new
        return node

    # Children before parents, so a rewritten node's template holds rewritten children
    # (sqlglot's transform() does not descend into a node it replaced).
    for node in reversed(list(tree.walk())):
        parent, key, index = node.parent, node.arg_key, node.index
        new = fix(node)
        if new is node:
            continue
        if parent is None:
            tree = new
        else:
            parent.set(key, new, index)
    return tree


def prune_dead_branches(tree: exp.Expression) -> exp.Expression:
    """Drop the UNION ALL branches whose WHERE is false once the arguments are bound: a
    macro reads an optional DuckDB-only source (query_table) in a branch of its own."""

    def always_false(branch: exp.Expression) -> bool:
        where = branch.args.get("where") if isinstance(branch, exp.Select) else None
        return where is not None and simplify(where.this.copy()) == exp.false()

    def prune(node):
        if isinstance(node, exp.Union) and not node.args.get("distinct"):
            if always_false(node.this):
                return node.expression
            if always_false(node.expression):
                return node.this
        return node

    return tree.transform(prune)


def to_spark(query: str, macros: dict[str, Macro]) -> str:
    """The Spark SQL text of a DuckDB query over the warehouse tables and macros."""
    try:
        statements = sqlglot.parse(query, read=WrittenDuckDB)
    except sqlglot.errors.ParseError as err:
        raise QueryError(f"cannot parse the query: {str(err).splitlines()[0]}") from None
    statements = [s for s in statements if s is not None]
    if len(statements) != 1 or not isinstance(statements[0], exp.Query):
        raise QueryError("the spark engine runs one query (SELECT ...); run other statements with the duckdb engine")
    tree = spark_fixes(prune_dead_branches(expand(statements[0], macros)))
    return tree.sql(dialect="spark")
