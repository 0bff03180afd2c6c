//! Usage reports: totals over a time range, optionally grouped by model, day, key or API.

use serde::Serialize;

use super::store::Dialect;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Model,
    Day,
    Key,
    /// The API the requests came in on: `chat`, `responses` or `messages`.
    Api,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "model" | "bot" => Some(GroupBy::Model),
            "day" => Some(GroupBy::Day),
            "key" => Some(GroupBy::Key),
            "api" => Some(GroupBy::Api),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReportQuery {
    pub since_ms: i64,
    pub until_ms: i64,
    /// Only this key's rows (`None`: everyone's).
    pub key_id: Option<String>,
    pub group_by: Option<GroupBy>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Totals {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_usd: f64,
    pub cache_hits: i64,
    pub saved_usd: f64,
    pub errors: i64,
    /// Rows whose bot has no known price: their cost is unknown, not 0.
    pub unpriced: i64,
    /// Rows whose tokens are the gateway's estimate (Poe sent no usage: a cut stream, a
    /// client gone), not Poe's count.
    pub estimated: i64,
    /// Of `prompt_tokens`, those the bots read from and wrote to their prompt caches, as Poe
    /// reported them (writes: the Messages API only). Rows from before the ledger stored them
    /// count 0.
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.total_tokens += o.total_tokens;
        self.cost_usd += o.cost_usd;
        self.cache_hits += o.cache_hits;
        self.saved_usd += o.saved_usd;
        self.errors += o.errors;
        self.unpriced += o.unpriced;
        self.estimated += o.estimated;
        self.cache_read_tokens += o.cache_read_tokens;
        self.cache_write_tokens += o.cache_write_tokens;
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Group {
    /// The model, day (`YYYY-MM-DD`, UTC), key id or API.
    pub group: String,
    #[serde(flatten)]
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub object: &'static str,
    pub since_ms: i64,
    pub until_ms: i64,
    pub group_by: Option<GroupBy>,
    pub totals: Totals,
    pub groups: Vec<Group>,
}

pub(crate) fn assemble(q: &ReportQuery, mut groups: Vec<Group>) -> Report {
    if q.group_by == Some(GroupBy::Day) {
        for g in &mut groups {
            g.group = day_name(&g.group);
        }
    }
    // By bytes, here rather than in SQL: Postgres orders text by the database's collation
    // (locale-dependent, case-folding) and SQLite by bytes, and one ledger may move between
    // them. Dates as `YYYY-MM-DD` sort in time order.
    groups.sort_unstable_by(|a, b| a.group.cmp(&b.group));
    let mut totals = Totals::default();
    for g in &groups {
        totals.add(&g.totals);
    }
    Report {
        object: "usage.report",
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        group_by: q.group_by,
        totals,
        groups: if q.group_by.is_some() {
            groups
        } else {
            Vec::new()
        },
    }
}

/// Days since the epoch (as text) to `YYYY-MM-DD`.
fn day_name(days: &str) -> String {
    let Ok(days) = days.parse::<i64>() else {
        return days.to_string();
    };
    time::OffsetDateTime::from_unix_timestamp(days * 86_400)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| days.to_string())
}

/// The `api` group of rows that name none: written before the column existed, or by an
/// older replica beside a newer one.
pub const UNKNOWN_API: &str = "unknown";

/// The columns added by additive migrations that a ledger has: all of them once a gateway
/// has migrated it, maybe not in one read without migrating (`poe-gateway usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Columns {
    pub api: bool,
    pub cache_tokens: bool,
    /// Not a report's: the keys' `expires_ms`.
    pub key_expiry: bool,
}

impl Columns {
    pub const ALL: Columns = Columns {
        api: true,
        cache_tokens: true,
        key_expiry: true,
    };
}

/// The report query: `[since, until)`, optional key filter, grouped. Columns, in order:
/// group, requests, prompt, completion, total, cost, cache hits, saved, errors, unpriced,
/// estimated, cache reads, cache writes. A column the ledger lacks (`has`) is read as none.
pub(crate) fn sql(d: Dialect, q: &ReportQuery, has: Columns) -> String {
    let int = |e: &str| match d {
        Dialect::Sqlite => format!("COALESCE({e}, 0)"),
        Dialect::Postgres => format!("COALESCE({e}, 0)::BIGINT"),
    };
    let real = |e: &str| match d {
        Dialect::Sqlite => format!("COALESCE({e}, 0.0)"),
        Dialect::Postgres => format!("COALESCE({e}, 0)::DOUBLE PRECISION"),
    };
    // Days are bucketed as whole days since the epoch (integer division, fast on both
    // databases) and written as dates by `assemble`.
    let group = match (q.group_by, d) {
        (None, _) => "''".to_string(),
        (Some(GroupBy::Model), _) => "bot".to_string(),
        (Some(GroupBy::Key), _) => "COALESCE(key_id, '')".to_string(),
        (Some(GroupBy::Day), _) => "CAST(ts_ms / 86400000 AS TEXT)".to_string(),
        (Some(GroupBy::Api), _) if has.api => format!("COALESCE(api, '{UNKNOWN_API}')"),
        (Some(GroupBy::Api), _) => format!("'{UNKNOWN_API}'"),
    };
    let key_filter = if q.key_id.is_some() {
        format!(" AND key_id = {}", d.ph(3))
    } else {
        String::new()
    };
    let (cache_read, cache_write) = if has.cache_tokens {
        (
            int("SUM(cache_read_tokens)"),
            int("SUM(cache_write_tokens)"),
        )
    } else {
        (int("NULL"), int("NULL"))
    };
    format!(
        "SELECT {group} AS g, {requests}, {prompt}, {completion}, {total}, {cost}, {hits}, {saved}, {errors}, {unpriced}, {estimated}, {cache_read}, {cache_write} \
         FROM usage WHERE ts_ms >= {p1} AND ts_ms < {p2}{key_filter} GROUP BY 1",
        requests = int("COUNT(*)"),
        prompt = int("SUM(prompt_tokens)"),
        completion = int("SUM(completion_tokens)"),
        total = int("SUM(total_tokens)"),
        cost = real("SUM(cost_usd)"),
        hits = int("SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END)"),
        saved = real("SUM(saved_usd)"),
        errors = int("SUM(CASE WHEN status >= 400 OR outcome <> 'completed' THEN 1 ELSE 0 END)"),
        unpriced = int("SUM(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END)"),
        estimated = int("SUM(CASE WHEN tokens_estimated THEN 1 ELSE 0 END)"),
        p1 = d.ph(1),
        p2 = d.ph(2),
    )
}

/// Renders a report as a table, JSON or CSV for the command line.
pub fn render(report: &Report, format: &str) -> String {
    match format {
        // Ended with a newline, as a command's output is.
        "json" => serde_json::to_string_pretty(report).unwrap_or_default() + "\n",
        "csv" => {
            let mut out = String::from(
                "group,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd,cache_hits,saved_usd,errors,unpriced,estimated,cache_read_tokens,cache_write_tokens\n",
            );
            for g in rows(report) {
                let t = &g.totals;
                out.push_str(&format!(
                    "{},{},{},{},{},{:.6},{},{:.6},{},{},{},{},{}\n",
                    csv_field(&g.group),
                    t.requests,
                    t.prompt_tokens,
                    t.completion_tokens,
                    t.total_tokens,
                    t.cost_usd,
                    t.cache_hits,
                    t.saved_usd,
                    t.errors,
                    t.unpriced,
                    t.estimated,
                    t.cache_read_tokens,
                    t.cache_write_tokens
                ));
            }
            out
        }
        _ => {
            let mut out = format!(
                "{:<28} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>8} {:>11} {:>7} {:>9}\n",
                "group",
                "requests",
                "prompt",
                "cache_read",
                "cache_write",
                "completion",
                "cost_usd",
                "hits",
                "saved_usd",
                "errors",
                "unpriced"
            );
            for g in rows(report) {
                let t = &g.totals;
                out.push_str(&format!(
                    "{:<28} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12.6} {:>8} {:>11.6} {:>7} {:>9}\n",
                    truncate(&g.group, 28),
                    t.requests,
                    t.prompt_tokens,
                    t.cache_read_tokens,
                    t.cache_write_tokens,
                    t.completion_tokens,
                    t.cost_usd,
                    t.cache_hits,
                    t.saved_usd,
                    t.errors,
                    t.unpriced
                ));
            }
            if report.totals.unpriced > 0 {
                out.push_str(&format!(
                    "note: {} request(s) used bots without a known price; their cost is not included\n",
                    report.totals.unpriced
                ));
            }
            if report.totals.estimated > 0 {
                out.push_str(&format!(
                    "note: the tokens of {} request(s) are the gateway's estimate (Poe sent no usage for them)\n",
                    report.totals.estimated
                ));
            }
            out
        }
    }
}

/// The groups, then a total line.
fn rows(report: &Report) -> Vec<Group> {
    let mut rows = report.groups.clone();
    rows.push(Group {
        group: "TOTAL".into(),
        totals: report.totals.clone(),
    });
    rows
}

/// One CSV cell. Group names come from clients (a model name is recorded even for a refused
/// request), so a name that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, or a
/// leading tab or carriage return) is prefixed with `'` and quoted: the admin who opens the
/// export sees the text and runs nothing.
fn csv_field(s: &str) -> String {
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula {
        format!("\"'{}\"", s.replace('"', "\"\""))
    } else if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

/// Parses a report bound: unix seconds, `YYYY-MM-DD` (UTC midnight), RFC 3339, or an age such
/// as `7d` or `36h` meaning that long before `now_ms`. Returns unix milliseconds.
pub fn parse_when(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        // Reports print their window in milliseconds, and one pasted back must mean the same
        // time: a number past 10^11 (the year 5138 in seconds) is milliseconds.
        return Ok(if n.unsigned_abs() >= 100_000_000_000 {
            n
        } else {
            n.saturating_mul(1000)
        });
    }
    if let Ok(age) = humantime::parse_duration(s) {
        let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms.saturating_sub(age));
    }
    let rfc3339 = |s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
    };
    // A `+01:00` offset written unescaped in a query string arrives as ` 01:00` (form
    // encoding reads `+` as a space); RFC 3339 has no other place for a space.
    let rfc3339_time = rfc3339(s).or_else(|| {
        let (at, offset) = s.rsplit_once(' ')?;
        rfc3339(&format!("{at}+{offset}"))
    });
    if let Some(t) = rfc3339_time {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let day = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = time::Date::parse(s, &day) {
        return Ok(d.midnight().assume_utc().unix_timestamp() * 1000);
    }
    Err(format!(
        "cannot read {s:?} as a time: use unix seconds or milliseconds, YYYY-MM-DD, RFC 3339, or an age like 7d"
    ))
}

/// A report window must be `[since, until)` with `since` first.
pub fn check_window(since_ms: i64, until_ms: i64) -> Result<(), String> {
    if until_ms <= since_ms {
        return Err(format!(
            "`until` ({until_ms} ms) must be later than `since` ({since_ms} ms): the window is [since, until)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_forms() {
        let now = 1_795_366_200_000;
        assert_eq!(parse_when("1795366200", now).unwrap(), now);
        // The milliseconds a report prints, pasted back.
        assert_eq!(parse_when("1795366200000", now).unwrap(), now);
        assert_eq!(parse_when("7d", now).unwrap(), now - 7 * 86_400_000);
        assert_eq!(parse_when("2026-11-01", now).unwrap(), 1_793_491_200_000);
        assert_eq!(parse_when("2026-11-22T16:50:00Z", now).unwrap(), now);
        assert_eq!(parse_when("2026-11-22T17:50:00+01:00", now).unwrap(), now);
        // The same, after a query string's `+` became a space.
        assert_eq!(parse_when("2026-11-22T17:50:00 01:00", now).unwrap(), now);
        assert_eq!(parse_when("1795366200", now).unwrap(), now);
        assert!(parse_when("yesterday-ish", now).is_err());
        // The smallest number is a time too (its absolute value overflowed: a panic).
        assert_eq!(parse_when("-9223372036854775808", now).unwrap(), i64::MIN);
        // An age past i64 milliseconds saturates rather than overflowing (it panicked).
        assert_eq!(
            parse_when("9223372036854775s 809ms", now).unwrap(),
            now - i64::MAX
        );
    }

    #[test]
    fn day_names() {
        assert_eq!(day_name("20779"), "2026-11-22");
        assert_eq!(day_name("0"), "1970-01-01");
    }
}
