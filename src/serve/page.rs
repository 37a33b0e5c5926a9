//! The status page (`/`): what a person opens in a browser to see the fleet.
//! Problems come first, each on its own row; the databases that are fine
//! are shown up to a screenful and then summed up in one row, so that the
//! page stays readable (and small) at 10,000 databases. `/?all` lists every
//! one; `/status.json` and `walsync status` have the rest.

use std::fmt::Write;

use crate::restore::format_ms;
use crate::status::{DbStatus, Snapshot};

/// Rows of databases with a problem before the rest of them are counted.
const PROBLEMS_SHOWN: usize = 500;
/// Rows of databases that are fine before the rest of them are summed up.
const FINE_SHOWN: usize = 50;

fn html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page for `s`; with `all`, every database on its own row.
pub fn status_page(s: &Snapshot, all: bool) -> String {
    let unhealthy = s.unhealthy();
    let degraded = s.degraded();
    let problems = s.databases.iter().filter(|d| has_problem(s, d)).count();
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>walsync</title>\
         <style>body{font-family:sans-serif;margin:2em;color:#222}\
         table{border-collapse:collapse;width:100%}\
         td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
         td.num{text-align:right;white-space:nowrap}td.time{white-space:nowrap}\
         td.path,td:first-child{white-space:nowrap}\
         .bad{color:#b00}.degraded{color:#a60}.summary td{color:#666;font-style:italic}\
         </style></head><body><h1>walsync</h1>",
    );
    let _ = write!(
        out,
        "<p id=\"counts\">{} databases: {} with a problem ({} unhealthy, {} degraded), {} fine; \
         up since {}. \
         <a href=\"/metrics\">metrics</a> · <a href=\"/health\">health</a> · \
         <a href=\"/status.json\">json</a> · <a href=\"/?all\">every database</a></p>",
        s.databases.len(),
        problems,
        unhealthy.len(),
        degraded.len(),
        s.databases.len() - problems,
        format_ms(s.started_ms)
    );
    if let Some(why) = &s.config.refused {
        let _ = write!(
            out,
            "<p class=\"bad\" id=\"config\">Configuration edit refused: {}; {}.</p>",
            html(why),
            html(crate::status::CONFIG_KEPT)
        );
    }
    if let Some(why) = &s.config.restart_needed {
        let _ = write!(
            out,
            "<p class=\"degraded\" id=\"restart\">Configuration: {}.</p>",
            html(why)
        );
    }
    if !degraded.is_empty() {
        let _ = write!(
            out,
            "<p class=\"degraded\" id=\"degraded\">Degraded: these databases keep losing \
             continuity (each loss is caught; nothing is lost): {}.</p>",
            html(crate::status::DEGRADED_HINT)
        );
    }
    out.push_str(
        "<table id=\"databases\"><tr><th>prefix</th><th>database</th><th>state</th>\
         <th>lag</th><th>head</th><th>last sync</th><th>problem</th></tr>",
    );
    let (problems, fine): (Vec<&DbStatus>, Vec<&DbStatus>) = s
        .problems_first()
        .into_iter()
        .partition(|d| has_problem(s, d));
    let problems_shown = if all { problems.len() } else { PROBLEMS_SHOWN };
    for d in problems.iter().take(problems_shown) {
        row(&mut out, s, d);
    }
    if problems.len() > problems_shown {
        summary(
            &mut out,
            &format!(
                "and {} more databases with a problem: see every database, or `walsync status`",
                problems.len() - problems_shown
            ),
        );
    }
    let fine_shown = if all { fine.len() } else { FINE_SHOWN };
    for d in fine.iter().take(fine_shown) {
        row(&mut out, s, d);
    }
    let rest = &fine[fine.len().min(fine_shown)..];
    if !rest.is_empty() {
        let longest = rest
            .iter()
            .map(|d| d.lag_seconds(s.now_ms))
            .fold(0.0f64, f64::max);
        let oldest = rest.iter().filter_map(|d| d.last_sync_ms).min();
        summary(
            &mut out,
            &format!(
                "and {} more databases, all fine: the longest lag among them {longest:.1} s, \
                 the oldest last sync {}",
                rest.len(),
                oldest.map_or("-".into(), format_ms)
            ),
        );
    }
    out.push_str("</table></body></html>\n");
    out
}

/// Unhealthy, degraded, forked or with a store behind: shown first and
/// never summed up.
fn has_problem(s: &Snapshot, d: &DbStatus) -> bool {
    d.unhealthy(s.now_ms).is_some()
        || d.is_degraded(s.now_ms)
        || d.forked.is_some()
        || !d.stores.is_empty()
}

fn row(out: &mut String, s: &Snapshot, d: &DbStatus) {
    let class = if d.unhealthy(s.now_ms).is_some() {
        " class=\"bad\""
    } else if d.is_degraded(s.now_ms) || d.forked.is_some() || !d.stores.is_empty() {
        " class=\"degraded\""
    } else {
        ""
    };
    let _ = write!(
        out,
        "<tr{class}><td>{}</td><td class=\"path\">{}</td><td>{}</td>\
         <td class=\"num\">{:.1} s</td><td class=\"num\">{}</td><td class=\"time\">{}</td>\
         <td>{}</td></tr>",
        html(&d.prefix),
        html(&d.path),
        s.shown_state(d),
        d.lag_seconds(s.now_ms),
        d.head.map_or("-".into(), |h| h.to_string()),
        d.last_sync_ms.map_or("-".into(), format_ms),
        html(&s.problem(d))
    );
}

fn summary(out: &mut String, text: &str) {
    let _ = write!(
        out,
        "<tr class=\"summary\"><td colspan=\"7\">{}</td></tr>",
        html(text)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::State;

    fn fleet(n: usize, failing: &[usize]) -> Snapshot {
        let databases = (0..n)
            .map(|i| DbStatus {
                prefix: format!("db{i:05}"),
                path: format!("/data/db{i:05}.db"),
                state: if failing.contains(&i) {
                    State::Failing
                } else {
                    State::Closed
                },
                last_error: failing.contains(&i).then(|| "storage refused".into()),
                head: Some(7),
                last_sync_ms: Some(1_000),
                sync_interval_ms: 1_000,
                ..DbStatus::default()
            })
            .collect();
        Snapshot {
            started_ms: 0,
            now_ms: 2_000,
            databases,
            config: Default::default(),
        }
    }

    #[test]
    fn ten_thousand_databases_make_a_short_page_with_the_problems_on_top() {
        let s = fleet(10_000, &[9_999, 4_242]);
        let page = status_page(&s, false);
        assert!(page.len() < 40_000, "{} bytes", page.len());
        assert_eq!(page.matches("<tr").count(), 1 + 2 + FINE_SHOWN + 1);
        let first = page.find("<td>db04242</td>").unwrap();
        assert!(first < page.find("<td>db09999</td>").unwrap());
        assert!(page.find("<td>db09999</td>").unwrap() < page.find("<td>db00000</td>").unwrap());
        assert!(page.contains("and 9948 more databases, all fine"), "{page}");
        assert!(
            page.contains("10000 databases: 2 with a problem (2 unhealthy, 0 degraded), 9998 fine")
        );
        let every = status_page(&s, true);
        assert_eq!(every.matches("<tr").count(), 1 + 10_000);
    }

    #[test]
    fn text_from_the_fleet_is_escaped() {
        let mut s = fleet(1, &[0]);
        s.databases[0].last_error = Some("<script>alert(1)</script>".into());
        let page = status_page(&s, false);
        assert!(!page.contains("<script>") && page.contains("&lt;script&gt;"));
    }
}
