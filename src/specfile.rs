//! The declarative `fleets.toml`: parsing it into validated `FleetSpec`s (every problem
//! reported with file, line, column and field, and a spec with any problem rejected whole),
//! nothing else: `reconcile::plan` turns old and new specs into the actions to carry out, the
//! node carries them out, and the field rules themselves live in `spec::FleetSpec::validate`.
//!
//! Every key of a fleet is optional except `name`; what is missing comes from `[defaults]`,
//! then from `FleetSpec::new`. Tables merge key by key (`[fleet.health]` with only `grace_ms`
//! keeps the other health defaults, `env` adds to the defaults' `env`); arrays and scalars
//! replace. Fleets are counted from 0 in messages (`fleet[0]`), like `agents[0]`.

use crate::spec::FleetSpec;
use crate::FleetError;
use serde_json::{Map, Value as Json};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml_edit::{Item, TableLike, Value as TomlValue};

/// A count in `agents = N` above this is taken for a typo.
pub const MAX_AGENT_COUNT: i64 = 10_000;

/// Parses a spec file's text. `origin` names the file in messages; a relative `template` is
/// resolved against `origin`'s directory.
pub fn parse_spec(text: &str, origin: &str) -> Result<Vec<FleetSpec>, FleetError> {
    let base = Path::new(origin).parent().unwrap_or(Path::new(""));
    parse_with_base(text, origin, base)
}

/// Reads and parses a spec file (bounded, regular files only); relative templates become
/// absolute paths next to it. Every template must exist inside the spec file's directory tree
/// (after symlinks are resolved) and be a JSON object; every custom command must name a
/// program that can run. Each template's content is taken into the spec (`template_config`).
pub fn load_spec(path: &Path) -> Result<Vec<FleetSpec>, FleetError> {
    let text = crate::operator_file::read_text(path, crate::operator_file::MAX_SPEC_BYTES)
        .map_err(|e| FleetError::Spec {
            reason: format!("{}: it {e}", path.display()),
        })?;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base = abs.parent().unwrap_or(Path::new("/"));
    let mut specs = parse_with_base(&text, &path.display().to_string(), base)?;
    let root = std::fs::canonicalize(base).map_err(|e| FleetError::Spec {
        reason: format!("{}: cannot resolve its directory: {e}", path.display()),
    })?;
    let mut problems = Vec::new();
    for spec in &mut specs {
        let mut templates: Vec<(String, &PathBuf)> = Vec::new();
        if let Some(t) = &spec.template {
            templates.push(("template".into(), t));
        }
        for (a, t) in &spec.tenants {
            if let Some(p) = &t.template {
                templates.push((format!("agent {a:?}: template"), p));
            }
        }
        for (field, t) in templates {
            match std::fs::canonicalize(t) {
                Err(e) => problems.push(format!(
                    "fleet {:?}: {field}: {}: {}",
                    spec.name,
                    t.display(),
                    if e.kind() == std::io::ErrorKind::NotFound {
                        "does not exist".to_string()
                    } else {
                        e.to_string()
                    }
                )),
                Ok(real) if !real.starts_with(&root) => problems.push(format!(
                    "fleet {:?}: {field}: {} resolves to {}, outside the spec's directory {}",
                    spec.name,
                    t.display(),
                    real.display(),
                    root.display()
                )),
                Ok(_) => {}
            }
        }
        if !problems.is_empty() {
            continue;
        }
        if let Err(e) = crate::provision::accept_files(spec) {
            problems.push(match e {
                FleetError::Spec { reason } => reason,
                other => other.to_string(),
            });
        }
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(FleetError::Spec {
            reason: format!(
                "{}: {}; nothing applied",
                path.display(),
                problems.join("; ")
            ),
        })
    }
}

/// One problem found in the file: where, which field (already labelled with its fleet), why.
struct Problem {
    at: Option<Range<usize>>,
    field: String,
    reason: String,
}

/// Where each value was written, keyed by its path inside its fleet or `[defaults]`
/// (`health.grace_ms`, `agents[2]`): the same spelling `FleetSpec::validate` uses.
type Spans = HashMap<String, Range<usize>>;

/// A fleet (or `[defaults]`) as written, converted to JSON so serde can check it.
struct RawTable {
    header: Option<Range<usize>>,
    map: Map<String, Json>,
    spans: Spans,
}

fn parse_with_base(text: &str, origin: &str, base: &Path) -> Result<Vec<FleetSpec>, FleetError> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        let reason = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(", ");
        FleetError::Spec {
            reason: format!("{}: syntax error: {reason}", locate(text, origin, e.span())),
        }
    })?;
    let mut problems = Vec::new();
    let mut defaults = RawTable {
        header: None,
        map: Map::new(),
        spans: Spans::new(),
    };
    let mut fleets = Vec::new();
    let root = doc.as_table();
    for (key, item) in root.iter() {
        let at = item.span().or_else(|| root.key(key).and_then(|k| k.span()));
        let mut conv = Vec::new();
        match key {
            "defaults" => match item.as_table_like() {
                Some(t) => {
                    defaults = raw_table(t, at, &mut conv);
                    label(&mut problems, conv, |f| format!("defaults.{f}"));
                }
                None => problems.push(Problem {
                    at,
                    field: "defaults".into(),
                    reason: "must be a table: write [defaults]".into(),
                }),
            },
            "fleet" => {
                let mut tables: Vec<(&dyn TableLike, Option<Range<usize>>)> = Vec::new();
                if let Some(aot) = item.as_array_of_tables() {
                    tables.extend(aot.iter().map(|t| (t as &dyn TableLike, t.span())));
                } else if let Some(arr) = item.as_value().and_then(TomlValue::as_array) {
                    for (i, v) in arr.iter().enumerate() {
                        match v.as_inline_table() {
                            Some(t) => tables.push((t as &dyn TableLike, v.span())),
                            None => problems.push(Problem {
                                at: v.span(),
                                field: format!("fleet[{}]", fleets.len() + i),
                                reason: "must be a table".into(),
                            }),
                        }
                    }
                } else {
                    problems.push(Problem {
                        at,
                        field: "fleet".into(),
                        reason: "must be an array of tables: write [[fleet]] above each fleet"
                            .into(),
                    });
                }
                for (t, header) in tables {
                    let i = fleets.len();
                    let name = t.get("name").and_then(Item::as_str).map(str::to_string);
                    fleets.push(raw_table(t, header, &mut conv));
                    label(&mut problems, std::mem::take(&mut conv), |f| match &name {
                        Some(n) => format!("fleet {n:?}: {f}"),
                        None => format!("fleet[{i}].{f}"),
                    });
                }
            }
            other => problems.push(Problem {
                at,
                field: other.to_string(),
                reason: "unknown key: expected [defaults] or [[fleet]]".into(),
            }),
        }
    }

    let schema = serde_json::to_value(FleetSpec::new("")).expect("FleetSpec serializes");
    if defaults.map.remove("name").is_some() {
        problems.push(Problem {
            at: defaults.spans.get("name").cloned(),
            field: "defaults.name".into(),
            reason: "a fleet name cannot have a default".into(),
        });
    }
    let found = check_table(&mut defaults, &schema, base);
    label(&mut problems, found, |f| format!("defaults.{f}"));

    let mut specs: Vec<(FleetSpec, Option<Range<usize>>)> = Vec::new();
    for (i, mut raw) in fleets.into_iter().enumerate() {
        let named = match raw.map.get("name") {
            Some(Json::String(n)) => Some(n.clone()),
            _ => None,
        };
        let field = |f: &str| match &named {
            Some(n) => format!("fleet {n:?}: {f}"),
            None => format!("fleet[{i}].{f}"),
        };
        let mut name_reported = false;
        if !raw.map.contains_key("name") {
            name_reported = true;
            problems.push(Problem {
                at: raw.header.clone(),
                field: field("name"),
                reason: "missing: every fleet needs a name".into(),
            });
        }
        let found = check_table(&mut raw, &schema, base);
        name_reported |= found.iter().any(|(_, f, _)| f == "name");
        label(&mut problems, found, field);
        let mut merged = schema.clone();
        merge(&mut merged, Json::Object(defaults.map.clone()));
        merge(&mut merged, Json::Object(raw.map));
        let spec: FleetSpec = match serde_json::from_value(merged) {
            Ok(s) => s,
            Err(e) => {
                // Every key passed on its own above, so this is a combination serde refuses.
                problems.push(Problem {
                    at: raw.header.clone(),
                    field: field("").trim_end_matches(['.', ' ', ':']).to_string(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        for p in spec.validate() {
            if name_reported && p.field == "name" {
                continue;
            }
            problems.push(Problem {
                at: find_span(&p.field, &raw.spans, &defaults.spans).or(raw.header.clone()),
                field: field(&p.field),
                reason: p.reason,
            });
        }
        specs.push((spec, raw.spans.get("name").cloned()));
    }

    let mut first: HashMap<&str, Option<Range<usize>>> = HashMap::new();
    for (spec, at) in &specs {
        if let Some(prev) = first.get(spec.name.as_str()) {
            let line = prev
                .as_ref()
                .map(|r| format!(" (first at line {})", line_col(text, r.start).0))
                .unwrap_or_default();
            problems.push(Problem {
                at: at.clone(),
                field: format!("fleet {:?}: name", spec.name),
                reason: format!("duplicate fleet name{line}"),
            });
        } else {
            first.insert(&spec.name, at.clone());
        }
    }

    if problems.is_empty() {
        return Ok(specs.into_iter().map(|(s, _)| s).collect());
    }
    problems.sort_by_key(|p| p.at.as_ref().map_or(usize::MAX, |r| r.start));
    let lines: Vec<String> = problems
        .iter()
        .map(|p| {
            format!(
                "{}: {}: {}",
                locate(text, origin, p.at.clone()),
                p.field,
                p.reason
            )
        })
        .collect();
    let reason = if lines.len() == 1 {
        lines.into_iter().next().unwrap_or_default()
    } else {
        format!(
            "{} problems in {origin}, nothing applied: {}",
            lines.len(),
            lines.join("; ")
        )
    };
    Err(FleetError::Spec { reason })
}

/// Problems found inside one table, not yet labelled: (where, path, reason).
type Found = Vec<(Option<Range<usize>>, String, String)>;

fn label(out: &mut Vec<Problem>, found: Found, field: impl Fn(&str) -> String) {
    out.extend(found.into_iter().map(|(at, f, reason)| Problem {
        at,
        field: field(&f),
        reason,
    }));
}

fn locate(text: &str, origin: &str, at: Option<Range<usize>>) -> String {
    match at {
        Some(r) => {
            let (line, col) = line_col(text, r.start);
            format!("{origin}:{line}:{col}")
        }
        None => origin.to_string(),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The span of `field` or, failing that, of its nearest enclosing table: the fleet's own
/// first, then `[defaults]` (a bad default is reported where it was written).
fn find_span(field: &str, own: &Spans, defaults: &Spans) -> Option<Range<usize>> {
    let mut f = field;
    loop {
        if let Some(r) = own.get(f).or_else(|| defaults.get(f)) {
            return Some(r.clone());
        }
        let cut = f.rfind(['.', '['])?;
        f = &f[..cut];
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn raw_table(t: &dyn TableLike, header: Option<Range<usize>>, found: &mut Found) -> RawTable {
    let mut spans = Spans::new();
    let map = table_to_json(t, "", &mut spans, found);
    RawTable { header, map, spans }
}

fn table_to_json(
    t: &dyn TableLike,
    prefix: &str,
    spans: &mut Spans,
    found: &mut Found,
) -> Map<String, Json> {
    let mut map = Map::new();
    for (k, item) in t.iter() {
        let path = join(prefix, k);
        if let Some(at) = item.span().or_else(|| t.key(k).and_then(|k| k.span())) {
            spans.insert(path.clone(), at);
        }
        if let Some(v) = item_to_json(item, &path, spans, found) {
            map.insert(k.to_string(), v);
        }
    }
    map
}

/// `None` after recording a problem: the key is left out, so the rest can still be checked.
fn item_to_json(item: &Item, path: &str, spans: &mut Spans, found: &mut Found) -> Option<Json> {
    match item {
        Item::None => None,
        Item::Value(v) => value_to_json(v, path, spans, found),
        Item::Table(t) => Some(Json::Object(table_to_json(t, path, spans, found))),
        Item::ArrayOfTables(a) => {
            let mut out = Vec::new();
            for (i, t) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if let Some(at) = t.span() {
                    spans.insert(p.clone(), at);
                }
                out.push(Json::Object(table_to_json(t, &p, spans, found)));
            }
            Some(Json::Array(out))
        }
    }
}

fn value_to_json(v: &TomlValue, path: &str, spans: &mut Spans, found: &mut Found) -> Option<Json> {
    let mut bad = |reason: &str| {
        found.push((v.span(), path.to_string(), reason.to_string()));
        None
    };
    match v {
        TomlValue::String(s) => Some(Json::String(s.value().clone())),
        TomlValue::Integer(i) => Some(Json::from(*i.value())),
        TomlValue::Float(f) => match serde_json::Number::from_f64(*f.value()) {
            Some(n) => Some(Json::Number(n)),
            None => bad("must be a finite number"),
        },
        TomlValue::Boolean(b) => Some(Json::Bool(*b.value())),
        TomlValue::Datetime(_) => bad("dates and times are not accepted in a fleet spec"),
        TomlValue::Array(a) => {
            let mut out = Vec::new();
            let mut ok = true;
            for (i, e) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if let Some(at) = e.span() {
                    spans.insert(p.clone(), at);
                }
                match value_to_json(e, &p, spans, found) {
                    Some(j) => out.push(j),
                    None => ok = false,
                }
            }
            ok.then_some(Json::Array(out))
        }
        TomlValue::InlineTable(t) => Some(Json::Object(table_to_json(t, path, spans, found))),
    }
}

/// Normalizes the shorthand forms, then checks every key on its own against `FleetSpec`'s
/// serde rules, so one bad value cannot hide another. Bad keys are removed from `raw` (and
/// reported) so the rest can still be validated.
fn check_table(raw: &mut RawTable, schema: &Json, base: &Path) -> Found {
    let mut found = Found::new();
    let spans = &raw.spans;
    let mut fail = |map: &mut Map<String, Json>, key: &str, reason: String| {
        map.remove(key);
        found.push((spans.get(key).cloned(), key.to_string(), reason));
    };
    let map = &mut raw.map;
    match map.get("agents") {
        None | Some(Json::Array(_)) => {}
        Some(Json::Number(n)) => match n.as_i64() {
            Some(c) if (0..=MAX_AGENT_COUNT).contains(&c) => {
                let list = FleetSpec::numbered_agents(c as u32);
                map.insert("agents".into(), Json::from(list));
            }
            _ => fail(
                map,
                "agents",
                format!("{n} is not a count between 0 and {MAX_AGENT_COUNT}"),
            ),
        },
        Some(_) => fail(
            map,
            "agents",
            "must be a count or a list of agent ids".into(),
        ),
    }
    if map.contains_key("tenants") {
        fail(
            map,
            "tenants",
            "unknown key: write an agent's own settings as a [[fleet.agents]] table with its id"
                .into(),
        );
    }
    if let Some(Json::Array(list)) = map.get("agents") {
        match split_agent_tables(list, base) {
            Ok((ids, tenants)) => {
                map.insert("agents".into(), Json::from(ids));
                if !tenants.is_empty() {
                    map.insert("tenants".into(), Json::Object(tenants));
                }
            }
            Err((key, reason)) => {
                // Reported at the element; the whole list goes so validation sees no agents.
                map.remove("agents");
                fail(map, &key, reason);
            }
        }
    }
    if let Some(Json::String(line)) = map.get("command") {
        match shell_words::split(line) {
            Ok(words) => {
                map.insert("command".into(), Json::from(words));
            }
            Err(e) => fail(map, "command", format!("cannot split into words: {e}")),
        }
    }
    if let Err(e) = normalize_size(map, "max_memory") {
        fail(map, "max_memory", e);
    }
    if let Some(Json::Object(cg)) = map.get_mut("cgroup") {
        if let Err(e) = normalize_size(cg, "memory_max") {
            cg.remove("memory_max");
            found.push((
                spans.get("cgroup.memory_max").cloned(),
                "cgroup.memory_max".into(),
                e,
            ));
        }
    }
    if let Some(Json::String(t)) = map.get("template") {
        let p = Path::new(t);
        if p.is_relative() {
            let abs: PathBuf = base.join(p);
            map.insert(
                "template".into(),
                Json::String(abs.to_string_lossy().into_owned()),
            );
        }
    }

    let mut leaves = Vec::new();
    collect_leaves(schema, map, &mut Vec::new(), &mut leaves);
    for (path, value) in leaves {
        let mut probe = schema.clone();
        set_path(&mut probe, &path, value);
        if let Err(e) = serde_json::from_value::<FleetSpec>(probe) {
            remove_path(map, &path);
            let key = path.join(".");
            found.push((spans.get(&key).cloned(), key, e.to_string()));
        }
    }
    found
}

/// The agent ids in order, and each one's own settings as written.
type AgentTables = (Vec<String>, Map<String, Json>);

/// `agents` as written (ids, or tables with an `id` and the agent's own settings) → the ids in
/// order and the settings by id, every relative path resolved against `base`. Err: the
/// element's key (`agents[2]`) and why.
fn split_agent_tables(list: &[Json], base: &Path) -> Result<AgentTables, (String, String)> {
    let mut ids = Vec::with_capacity(list.len());
    let mut tenants = Map::new();
    for (i, a) in list.iter().enumerate() {
        let key = format!("agents[{i}]");
        let mut table = match a {
            Json::String(id) => {
                ids.push(id.clone());
                continue;
            }
            Json::Object(t) => t.clone(),
            _ => {
                return Err((
                    key,
                    "must be an agent id (a string) or a table with an id".into(),
                ))
            }
        };
        let id = match table.remove("id") {
            Some(Json::String(id)) => id,
            Some(_) => return Err((format!("{key}.id"), "must be a string".into())),
            None => {
                return Err((
                    key,
                    "a table in agents needs an id: write id = \"alice\"".into(),
                ))
            }
        };
        if !crate::ids::is_valid_id(&id) {
            return Err((
                format!("{key}.id"),
                format!("{id:?} must be {}", crate::ids::ID_RULE),
            ));
        }
        if table.contains_key("template_config") {
            return Err((
                format!("{key}.template_config"),
                "unknown key: fleetd reads the template file itself (write template = \"FILE\")"
                    .into(),
            ));
        }
        let absolute = |v: &mut Json| {
            if let Json::String(s) = v {
                let p = Path::new(s.as_str());
                if p.is_relative() && !s.is_empty() {
                    *s = base.join(p).to_string_lossy().into_owned();
                }
            }
        };
        if let Some(t) = table.get_mut("template") {
            absolute(t);
        }
        for key in ["secrets", "files"] {
            if let Some(Json::Object(m)) = table.get_mut(key) {
                m.values_mut().for_each(absolute);
            }
        }
        if let Err(e) =
            serde_json::from_value::<crate::spec::AgentSettings>(Json::Object(table.clone()))
        {
            return Err((key, format!("agent {id:?}: {e}")));
        }
        ids.push(id.clone());
        if tenants.insert(id.clone(), Json::Object(table)).is_some() {
            return Err((key, format!("duplicate agent id {id:?}")));
        }
    }
    Ok((ids, tenants))
}

/// A size given as a string with a unit (`"768MiB"`) becomes a byte count in place.
fn normalize_size(map: &mut Map<String, Json>, key: &str) -> Result<(), String> {
    match map.get(key) {
        Some(Json::String(s)) => {
            let n = parse_bytes(s)?;
            map.insert(key.into(), Json::from(n));
            Ok(())
        }
        Some(Json::Number(n)) if n.as_u64().is_none() => Err(format!(
            "{n} is not a byte count: use a whole number or a size like \"768MiB\""
        )),
        _ => Ok(()),
    }
}

/// The keys to check one by one: the fleet's own keys, and the keys inside sub-tables that
/// `FleetSpec` spells out (`health.grace_ms`); free-form maps such as `env` are one leaf.
fn collect_leaves(
    schema: &Json,
    map: &Map<String, Json>,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, Json)>,
) {
    for (k, v) in map {
        path.push(k.clone());
        match (schema.get(k), v) {
            (Some(Json::Object(s)), Json::Object(m)) if !s.is_empty() => {
                collect_leaves(&Json::Object(s.clone()), m, path, out)
            }
            _ => out.push((path.clone(), v.clone())),
        }
        path.pop();
    }
}

fn set_path(root: &mut Json, path: &[String], value: Json) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = root;
    for p in parents {
        at = &mut at[p.as_str()];
    }
    if let Json::Object(m) = at {
        m.insert(last.clone(), value);
    }
}

fn remove_path(map: &mut Map<String, Json>, path: &[String]) {
    match path {
        [] => {}
        [k] => {
            map.remove(k);
        }
        [k, rest @ ..] => {
            if let Some(Json::Object(m)) = map.get_mut(k) {
                remove_path(m, rest);
            }
        }
    }
}

/// Tables merge key by key; everything else replaces.
fn merge(base: &mut Json, over: Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// `"768MiB"`, `"2GB"`, `"1048576"` → bytes. Binary (KiB, MiB, GiB, TiB) and decimal (KB,
/// MB, GB, TB) units, any case, optional space; whole numbers only.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!("{s:?} is not a size: use a whole number with B, KiB, MiB, GiB, KB, MB or GB, like \"768MiB\"")
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Profile, RestartType, Strategy};

    fn ok(text: &str) -> Vec<FleetSpec> {
        parse_spec(text, "/srv/fleet/fleets.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn err(text: &str) -> String {
        match parse_spec(text, "fleets.toml") {
            Err(FleetError::Spec { reason }) => {
                assert!(!reason.contains('\n'), "one line expected: {reason}");
                reason
            }
            other => panic!("expected a spec error, got {other:?}\n{text}"),
        }
    }

    fn assert_has(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "{p:?} missing from: {msg}");
        }
    }

    #[test]
    fn agents_as_tables_carry_each_tenants_own_settings() {
        let specs = ok(r#"
[[fleet]]
name = "bots"
env = { LANG = "C" }

[[fleet.agents]]
id = "alice"
template = "tenants/alice.json"
env = { TZ = "Europe/Madrid" }
secrets = { TG_BOT_TOKEN = "/etc/fleet/secrets/alice.tg", OPENAI_API_KEY = "keys/alice.key" }
files = { ".openclaw/workspace/SOUL.md" = "tenants/alice/SOUL.md" }

[[fleet.agents]]
id = "bob"
"#);
        let f = &specs[0];
        assert_eq!(f.agents, ["alice", "bob"]);
        let a = f.tenant("alice").expect("alice's settings");
        assert_eq!(
            a.template.as_deref(),
            Some(Path::new("/srv/fleet/tenants/alice.json"))
        );
        assert_eq!(a.env["TZ"], "Europe/Madrid");
        assert_eq!(
            a.secrets["TG_BOT_TOKEN"],
            Path::new("/etc/fleet/secrets/alice.tg")
        );
        assert_eq!(
            a.secrets["OPENAI_API_KEY"],
            Path::new("/srv/fleet/keys/alice.key")
        );
        assert_eq!(
            a.files[".openclaw/workspace/SOUL.md"],
            Path::new("/srv/fleet/tenants/alice/SOUL.md")
        );
        assert!(f.tenant("bob").is_none_or(|t| t.is_empty()));
        assert_eq!(f.env["LANG"], "C");

        for (text, parts) in [
            (
                "[[fleet]]\nname = \"b\"\n[[fleet.agents]]\nenv = { A = \"1\" }\n",
                vec!["fleets.toml:3:1", "agents[0]", "needs an id"],
            ),
            (
                "[[fleet]]\nname = \"b\"\n[[fleet.agents]]\nid = \"a\"\nsecret = { K = \"/x\" }\n",
                vec!["agents[0]", "unknown field `secret`"],
            ),
            (
                "[[fleet]]\nname = \"b\"\n[[fleet.agents]]\nid = \"a\"\nfiles = { \"../x\" = \"/s\" }\n",
                vec!["agents.a.files", "inside the HOME"],
            ),
            (
                "[[fleet]]\nname = \"b\"\n[[fleet.agents]]\nid = \"a\"\nsecrets = { lower = \"/s\" }\n",
                vec!["agents.a.secrets.lower", "A-Z"],
            ),
            (
                "[[fleet]]\nname = \"b\"\ntenants = {}\n",
                vec!["tenants", "[[fleet.agents]]"],
            ),
        ] {
            assert_has(&err(text), &parts);
        }
    }

    #[test]
    fn count_and_list_forms() {
        let specs = ok(r#"
[[fleet]]
name = "a"
agents = 3
[[fleet]]
name = "b"
agents = ["alice", "bob"]
[[fleet]]
name = "c"
"#);
        let agents: Vec<_> = specs.iter().map(|s| s.agents.clone()).collect();
        assert_eq!(
            agents,
            vec![
                vec!["agent-1", "agent-2", "agent-3"],
                vec!["alice", "bob"],
                vec![],
            ]
        );
    }

    #[test]
    fn unset_keys_get_fleet_spec_defaults() {
        let specs = ok("[[fleet]]\nname = \"plain\"\n");
        assert_eq!(specs, vec![FleetSpec::new("plain")]);
    }

    #[test]
    fn defaults_apply_unless_the_fleet_sets_them() {
        let specs = ok(r#"
[defaults]
stop_timeout_ms = 5000
strategy = "one_for_all"
env = { A = "1", B = "2" }
[defaults.health]
grace_ms = 1000
failures = 7

[[fleet]]
name = "inherits"

[[fleet]]
name = "overrides"
stop_timeout_ms = 9000
env = { B = "x", C = "3" }
[fleet.health]
grace_ms = 2000
"#);
        let (a, b) = (&specs[0], &specs[1]);
        assert_eq!(a.stop_timeout_ms, 5000);
        assert_eq!(a.strategy, Strategy::OneForAll);
        assert_eq!(a.health.grace_ms, 1000);
        assert_eq!(a.health.failures, 7);
        assert_eq!(b.stop_timeout_ms, 9000);
        assert_eq!(b.strategy, Strategy::OneForAll);
        assert_eq!(b.health.grace_ms, 2000);
        assert_eq!(b.health.failures, 7, "sub-tables merge key by key");
        assert_eq!(b.health.interval_ms, FleetSpec::new("x").health.interval_ms);
        let env: Vec<_> = b.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(env, ["A=1", "B=x", "C=3"]);
    }

    #[test]
    fn partial_intensity_keeps_the_other_default() {
        let specs = ok(
            "[[fleet]]\nname = \"f\"\nbackoff.max_ms = 900\n[fleet.intensity]\nmax_restarts = 9\n",
        );
        assert_eq!(specs[0].backoff.max_ms, 900, "dotted keys work too");
        assert_eq!(specs[0].backoff.initial_ms, 500);
        assert_eq!(specs[0].intensity.max_restarts, 9);
        assert_eq!(specs[0].intensity.window_s, 300);
    }

    #[test]
    fn relative_template_resolves_against_the_spec_directory() {
        let specs = ok(r#"
[[fleet]]
name = "rel"
template = "templates/bots.json"
[[fleet]]
name = "abs"
template = "/opt/t.json"
"#);
        assert_eq!(
            specs[0].template.as_deref(),
            Some(Path::new("/srv/fleet/templates/bots.json"))
        );
        assert_eq!(specs[1].template.as_deref(), Some(Path::new("/opt/t.json")));
    }

    #[test]
    fn load_spec_makes_templates_absolute_next_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleets.toml");
        std::fs::write(&path, "[[fleet]]\nname = \"f\"\ntemplate = \"t.json\"\n").unwrap();
        std::fs::write(dir.path().join("t.json"), r#"{"a":1}"#).unwrap();
        let specs = load_spec(&path).unwrap();
        let t = specs[0].template.clone().unwrap();
        assert!(t.is_absolute(), "{t:?}");
        assert_eq!(t, std::path::absolute(dir.path()).unwrap().join("t.json"));
        assert_eq!(specs[0].template_config, Some(serde_json::json!({"a": 1})));
    }

    #[test]
    fn load_spec_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let msg = load_spec(&path).unwrap_err().to_string();
        assert_has(&msg, &[&path.display().to_string(), "does not exist"]);
    }

    #[test]
    fn value_errors_name_the_fleet_not_its_index() {
        let msg = err("[[fleet]]\nname = \"web\"\nstop_timeout_ms = 1979-05-27\n");
        assert_has(&msg, &["fleet \"web\": stop_timeout_ms", "dates and times"]);
        assert!(!msg.contains("fleet[0]"), "{msg}");
        let msg = err("[[fleet]]\nstop_timeout_ms = 1979-05-27\n");
        assert_has(&msg, &["fleet[0].stop_timeout_ms"]);
    }

    #[test]
    fn load_spec_refuses_what_its_fleets_name_on_disk() {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("spec");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(outer.path().join("outside.json"), "{}").unwrap();
        std::fs::write(dir.join("array.json"), "[1]").unwrap();
        std::fs::write(dir.join("bad.json"), "{,}").unwrap();
        std::os::unix::fs::symlink(outer.path().join("outside.json"), dir.join("link.json"))
            .unwrap();
        let fifo = dir.join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let path = dir.join("fleets.toml");
        let cases = [
            ("template = \"missing.json\"", "does not exist"),
            (
                "template = \"../outside.json\"",
                "outside the spec's directory",
            ),
            ("template = \"link.json\"", "outside the spec's directory"),
            ("template = \"array.json\"", "must be a JSON object"),
            ("template = \"bad.json\"", "invalid JSON at line 1"),
            ("template = \"fifo.json\"", "a FIFO, not a regular file"),
            ("template = \".\"", "a directory, not a regular file"),
            ("command = \"/nonexistent/agent --x\"", "cannot be run"),
            (
                "command = \"no-such-program-anywhere\"",
                "not found in PATH",
            ),
        ];
        for (line, want) in cases {
            std::fs::write(&path, format!("[[fleet]]\nname = \"f\"\n{line}\n")).unwrap();
            let msg = load_spec(&path).unwrap_err().to_string();
            assert_has(&msg, &["fleet \"f\"", want]);
        }
        for target in ["/dev/zero", "/nonexistent"] {
            let link = dir.join("spec-link.toml");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link).unwrap();
            let msg = load_spec(&link).unwrap_err().to_string();
            assert!(
                msg.contains("not a regular file") || msg.contains("does not exist"),
                "{msg}"
            );
        }
    }

    #[test]
    fn max_memory_units() {
        for (input, bytes) in [
            ("\"768MiB\"", 768u64 << 20),
            ("\"1GiB\"", 1 << 30),
            ("\"2048 KiB\"", 2048 << 10),
            ("\"2GB\"", 2_000_000_000),
            ("\"1500KB\"", 1_500_000),
            ("\"300MB\"", 300_000_000),
            ("\"5mib\"", 5 << 20),
            ("\"2097152\"", 2_097_152),
            ("4194304", 4_194_304),
        ] {
            let specs = ok(&format!("[[fleet]]\nname = \"f\"\nmax_memory = {input}\n"));
            assert_eq!(specs[0].max_memory, Some(bytes), "max_memory = {input}");
        }
        for bad in [
            "\"12 parsecs\"",
            "\"MiB\"",
            "\"1.5GiB\"",
            "-5",
            "\"99999999999TiB\"",
        ] {
            let msg = err(&format!("[[fleet]]\nname = \"f\"\nmax_memory = {bad}\n"));
            assert_has(&msg, &["fleets.toml:3:14: fleet \"f\": max_memory:"]);
        }
    }

    #[test]
    fn cgroup_limits_take_units_and_name_bad_fields() {
        let specs = ok("[[fleet]]\nname = \"f\"\n[fleet.cgroup]\nmemory_max = \"1GiB\"\npids_max = 64\ncpu_max = 50\n");
        assert_eq!(specs[0].cgroup.memory_max, Some(1 << 30));
        assert_eq!(specs[0].cgroup.pids_max, Some(64));
        assert_eq!(specs[0].cgroup.cpu_max, Some(50));
        let inline = ok("[[fleet]]\nname = \"f\"\ncgroup = { memory_max = 2097152 }\n");
        assert_eq!(inline[0].cgroup.memory_max, Some(2 << 20));
        assert_eq!(inline[0].cgroup.pids_max, None);
        let msg = err("[[fleet]]\nname = \"f\"\n[fleet.cgroup]\nmemory_max = \"lots\"\n");
        assert_has(&msg, &["fleets.toml:4:14:", "cgroup.memory_max"]);
        let msg = err("[[fleet]]\nname = \"f\"\n[fleet.cgroup]\ncpu_max = 0\npids_max = -1\n");
        assert_has(&msg, &["cgroup.cpu_max", "cgroup.pids_max"]);
        let msg = err("[[fleet]]\nname = \"f\"\n[fleet.cgroup]\nmemory.max = 5\n");
        assert_has(&msg, &["cgroup"]);
    }

    #[test]
    fn command_string_is_split_like_a_shell() {
        let specs = ok(r#"
[[fleet]]
name = "s"
command = "/bin/prog --name 'two words' -v"
[[fleet]]
name = "l"
command = ["/bin/prog", "--flag"]
"#);
        assert_eq!(
            specs[0].command.as_deref().unwrap(),
            ["/bin/prog", "--name", "two words", "-v"]
        );
        assert_eq!(
            specs[1].command.as_deref().unwrap(),
            ["/bin/prog", "--flag"]
        );
        let msg = err("[[fleet]]\nname = \"s\"\ncommand = \"prog 'open\"\n");
        assert_has(
            &msg,
            &["fleets.toml:3:11: fleet \"s\": command: cannot split"],
        );
    }

    #[test]
    fn syntax_error_keeps_its_line() {
        let msg = err("[[fleet]]\nname = \"a\"\nagents = [1, 2\nstrategy = \"one_for_one\"\n");
        assert_has(&msg, &["fleets.toml:4:", "syntax error"]);
        let msg = err("[[fleet]]\nname = \"a\"\nname = \"b\"\n");
        assert_has(&msg, &["fleets.toml:3:", "syntax error", "duplicate key"]);
    }

    #[test]
    fn bad_enum_value_names_line_column_and_field() {
        let msg = err("[[fleet]]\nname = \"bots\"\nstrategy = \"one-for-all\"\n");
        assert_has(
            &msg,
            &["fleets.toml:3:12: fleet \"bots\": strategy: unknown variant `one-for-all`"],
        );
    }

    #[test]
    fn unnamed_fleet_is_named_by_index() {
        let msg = err("[[fleet]]\nname = \"a\"\n[[fleet]]\nrestart = \"sometimes\"\n");
        assert_has(
            &msg,
            &[
                "fleets.toml:3:1: fleet[1].name: missing",
                "fleets.toml:4:11: fleet[1].restart: unknown variant `sometimes`",
                "2 problems",
            ],
        );
    }

    #[test]
    fn unknown_keys_are_errors_at_every_level() {
        let msg = err(r#"
[[fleet]]
name = "bots"
strategyy = "one_for_all"
[fleet.health]
grace = 5
"#);
        assert_has(
            &msg,
            &[
                "fleets.toml:4:13: fleet \"bots\": strategyy: unknown field `strategyy`",
                "fleets.toml:6:9: fleet \"bots\": health.grace: unknown field `grace`",
            ],
        );
        let msg = err("[fleets]\nname = \"x\"\n");
        assert_has(&msg, &["fleets.toml:1:1: fleets: unknown key"]);
    }

    #[test]
    fn wrong_types_name_the_field() {
        let msg = err("[[fleet]]\nname = \"w\"\nstride = 70000\nagents = \"three\"\n");
        assert_has(
            &msg,
            &[
                "fleets.toml:3:10: fleet \"w\": stride: invalid value: integer `70000`",
                "fleets.toml:4:10: fleet \"w\": agents: must be a count or a list",
            ],
        );
        let msg = err("[[fleet]]\nname = \"w\"\nagents = [\"a\", 5]\n");
        assert_has(
            &msg,
            &["fleets.toml:3:16: fleet \"w\": agents[1]: must be an agent id"],
        );
    }

    #[test]
    fn validation_errors_point_at_the_offending_value() {
        let msg = err(r#"[[fleet]]
name = "bots"
agents = ["alice", "bob", "Bad_Id", "bob"]
stride = 20
[fleet.backoff]
jitter = 1.5
"#);
        assert_has(
            &msg,
            &[
                "4 problems",
                "fleets.toml:3:27: fleet \"bots\": agents[2]: \"Bad_Id\" must be",
                "fleets.toml:3:37: fleet \"bots\": agents[3]: duplicate agent id \"bob\"",
                "fleets.toml:4:10: fleet \"bots\": stride: 20 is too small for OpenClaw",
                "fleets.toml:6:10: fleet \"bots\": backoff.jitter: must be between 0 and 1",
            ],
        );
        let bad_name = err("[[fleet]]\nname = \"Bots\"\n");
        assert_has(&bad_name, &["fleets.toml:2:8: fleet \"Bots\": name:"]);
    }

    #[test]
    fn problem_from_a_default_points_at_the_default() {
        let msg = err(
            "[defaults]\nstride = 50\n\n[[fleet]]\nname = \"oc\"\n\n[[fleet]]\nname = \"custom\"\ncommand = [\"x\"]\n",
        );
        assert_has(
            &msg,
            &["fleets.toml:2:10: fleet \"oc\": stride: 50 is too small"],
        );
        assert!(!msg.contains("custom"), "{msg}");
        let msg = err("[defaults]\nname = \"x\"\nrestart = 3\n");
        assert_has(
            &msg,
            &[
                "fleets.toml:2:8: defaults.name: a fleet name cannot have a default",
                "fleets.toml:3:11: defaults.restart: invalid type: integer `3`",
            ],
        );
    }

    #[test]
    fn duplicate_fleet_names() {
        let msg =
            err("[[fleet]]\nname = \"a\"\n[[fleet]]\nname = \"b\"\n[[fleet]]\nname = \"a\"\n");
        assert_has(
            &msg,
            &["fleets.toml:6:8: fleet \"a\": name: duplicate fleet name (first at line 2)"],
        );
    }

    #[test]
    fn one_bad_fleet_rejects_the_whole_file() {
        let text = r#"
[[fleet]]
name = "good-one"
agents = 2
[[fleet]]
name = "broken"
agents = 2
[fleet.health]
failures = 0
[[fleet]]
name = "good-two"
"#;
        let msg = err(text);
        assert_has(
            &msg,
            &["fleets.toml:9:12: fleet \"broken\": health.failures"],
        );
        assert!(!msg.contains("good-"), "{msg}");
        // The same file without the bad value parses: the rejection was only for it.
        assert_eq!(ok(&text.replace("failures = 0", "failures = 2")).len(), 3);
    }

    #[test]
    fn fleets_as_inline_array_and_empty_file() {
        let specs = ok("fleet = [{ name = \"a\", agents = 1 }, { name = \"b\" }]\n");
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].agents, ["agent-1"]);
        assert_eq!(ok("# nothing yet\n"), vec![]);
        let msg = err("[fleet]\nname = \"a\"\n");
        assert_has(
            &msg,
            &["fleets.toml:1:1: fleet: must be an array of tables"],
        );
    }

    fn example_path(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    #[test]
    fn example_file_parses() {
        // The example names files of an operator's host: parse it as text (load_spec would
        // check them on this machine).
        let path = example_path("examples/fleets.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let specs = parse_spec(&text, &path.display().to_string()).unwrap();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["bots", "workers", "customers"]);
        let alice = specs[2].tenant("alice").expect("alice's own settings");
        assert!(alice.secrets.contains_key("TG_BOT_TOKEN") && alice.files.len() == 1);
        let bots = &specs[0];
        assert_eq!(bots.agents.len(), 3);
        assert_eq!(bots.profile, Profile::Lean);
        assert_eq!(bots.max_memory, Some(768 << 20));
        assert_eq!(bots.stop_timeout_ms, 60_000);
        assert!(bots
            .template
            .as_ref()
            .unwrap()
            .ends_with("examples/templates/bots.json"));
        assert_eq!(specs[1].restart, RestartType::Transient);
        assert_eq!(specs[1].health.grace_ms, 10_000);
    }

    /// Every FleetSpec key (and sub-key) must be shown in the example, so a field added to
    /// the spec without documentation fails here.
    #[test]
    fn example_file_documents_every_key() {
        let text = std::fs::read_to_string(example_path("examples/fleets.toml")).unwrap();
        let doc = toml_edit::ImDocument::parse(text.as_str()).unwrap();
        let mut written = std::collections::BTreeSet::new();
        fn walk(t: &dyn TableLike, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
            for (k, item) in t.iter() {
                let p = join(prefix, k);
                if let Some(sub) = item.as_table_like() {
                    walk(sub, &p, out);
                }
                out.insert(p);
            }
        }
        let root = doc.as_table();
        walk(root["defaults"].as_table_like().unwrap(), "", &mut written);
        for t in root["fleet"].as_array_of_tables().unwrap().iter() {
            walk(t, "", &mut written);
        }
        let mut spec = FleetSpec::new("x");
        spec.command = Some(vec!["x".into()]);
        spec.template = Some("t".into());
        spec.stride = Some(1);
        spec.max_memory = Some(1 << 20);
        let schema = serde_json::to_value(&spec).unwrap();
        let mut missing = Vec::new();
        for (k, v) in schema.as_object().unwrap() {
            if !written.contains(k) {
                missing.push(k.clone());
            }
            if let Some(sub) = v.as_object().filter(|_| k != "env") {
                for s in sub.keys() {
                    let p = format!("{k}.{s}");
                    if !written.contains(&p) {
                        missing.push(p);
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "examples/fleets.toml does not show: {missing:?}"
        );
    }

    #[test]
    fn demo_fleet_is_three_lean_openclaw_tenants() {
        // scripts/demo.sh writes the secrets and fills in the fakes' addresses: parse as text.
        let path = example_path("fleets/demo/fleets.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let specs = parse_spec(&text, &path.display().to_string()).unwrap();
        assert_eq!(specs.len(), 1);
        let d = &specs[0];
        assert_eq!(d.name, "demo");
        assert_eq!(d.agents, ["alice", "bob", "carol"]);
        assert!(d.runs_openclaw());
        assert_eq!(d.profile, Profile::Lean);
        assert_eq!(d.health.grace_ms, 180_000);
        for a in &d.agents {
            let t = d.tenant(a).unwrap();
            assert_eq!(
                t.secrets.keys().collect::<Vec<_>>(),
                ["OPENAI_API_KEY", "TG_BOT_TOKEN"]
            );
            let tpl = t.template.as_ref().unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(tpl).unwrap()).unwrap();
            assert_eq!(v["channels"]["telegram"]["botToken"], "${TG_BOT_TOKEN}");
        }
    }
}
