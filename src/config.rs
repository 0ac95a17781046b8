//! `--config FILE`: the settings of each command in a TOML file, one table per command
//! (`[channel]`, `[gateway]`, `[publisher]`, `[standalone]`), keys named like the flags:
//!
//! ```toml
//! # pushwire.toml
//! [gateway]
//! workers = 4
//! heartbeat = "25s"
//! allowed-origins = ["https://example.com", "https://www.example.com"]
//! broker = "redis://127.0.0.1:6379"
//! ```
//!
//! The flags of each command are the one typed description of its settings; a file value is
//! checked against the flag it names (its TOML type, then the flag's own parser) and stops the
//! program with file and line when it is wrong or unknown. Precedence: defaults, then the file,
//! then environment variables, then flags.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use toml::{Spanned, Value};

/// The commands a file may configure.
pub const SECTIONS: [&str; 4] = ["channel", "gateway", "publisher", "standalone"];

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{file}:{line}: {msg}")]
    At { file: String, line: usize, msg: String },
}

/// One `key = value` of a section, with the line it is on.
#[derive(Debug, Clone)]
pub struct Setting {
    pub key: String,
    pub value: Value,
    pub line: usize,
}

/// The settings of a file, by section.
#[derive(Debug, Default)]
pub struct File {
    path: String,
    sections: BTreeMap<String, Vec<Setting>>,
    /// The Pusher apps (`[[apps]]`), for the gateway, the publisher and standalone.
    pub apps: Vec<crate::protocol::pusher::App>,
}

type Raw = BTreeMap<Spanned<String>, Spanned<Value>>;

/// The file's `[[apps]]`.
#[derive(serde::Deserialize)]
struct WithApps {
    #[serde(default)]
    apps: Vec<crate::protocol::pusher::App>,
}

impl File {
    /// Read and parse `path`: TOML syntax, and only the known sections.
    pub fn read(path: &Path) -> Result<File, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        File::parse(&path.display().to_string(), &text)
    }

    /// Parse `text`, named `path` in errors.
    pub fn parse(path: &str, text: &str) -> Result<File, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let at = |offset: usize, msg: String| ConfigError::At { file: path.to_owned(), line: line_of(offset), msg };
        let toml_error = |e: toml::de::Error| {
            let msg = e.message().to_owned();
            at(e.span().map_or(0, |s| s.start), msg)
        };
        let raw: Raw = toml::from_str(text).map_err(toml_error)?;
        let apps = toml::from_str::<WithApps>(text).map_err(toml_error)?.apps;
        for app in &apps {
            let line = text.find(&format!("\"{}\"", app.id)).unwrap_or(0);
            app.check().map_err(|e| at(line, e))?;
        }
        let mut sections = BTreeMap::new();
        for (name, table) in raw {
            if name.get_ref() == "apps" {
                continue;
            }
            if !SECTIONS.contains(&name.get_ref().as_str()) {
                let msg = format!("unknown section [{}] (sections: {}, [[apps]])", name.get_ref(), SECTIONS.join(", "));
                return Err(at(name.span().start, msg));
            }
            let span = table.span();
            let Value::Table(table) = table.into_inner() else {
                return Err(at(span.start, format!("[{}] must be a table of settings", name.get_ref())));
            };
            // Lines of the keys: found after the section's header.
            let mut settings: Vec<Setting> = table
                .into_iter()
                .map(|(k, v)| {
                    let offset = text[span.start.min(text.len())..].find(&k).map_or(span.start, |o| span.start + o);
                    Setting { line: line_of(offset), key: k, value: v }
                })
                .collect();
            settings.sort_by_key(|s| s.line);
            sections.insert(name.into_inner(), settings);
        }
        Ok(File { path: path.to_owned(), sections, apps })
    }

    /// The flags that the file's `[section]` adds to a command line of `cmd` (the subcommand),
    /// leaving out settings that `matches` already took from the command line or the environment.
    pub fn flags(&self, section: &str, cmd: &Command, matches: &ArgMatches) -> Result<Vec<String>, ConfigError> {
        let mut out = Vec::new();
        for s in self.sections.get(section).map(Vec::as_slice).unwrap_or_default() {
            let err = |msg: String| ConfigError::At { file: self.path.clone(), line: s.line, msg };
            let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(s.key.as_str())) else {
                return Err(err(format!(
                    "`pushwire {section}` has no setting {:?} (settings are its flag names)",
                    s.key
                )));
            };
            if matches!(
                matches.value_source(arg.get_id().as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            let key = &s.key;
            match (arg.get_action(), &s.value) {
                (ArgAction::SetTrue, Value::Boolean(true)) => out.push(format!("--{key}")),
                (ArgAction::SetTrue, Value::Boolean(false)) => {}
                (ArgAction::SetTrue, v) => return Err(err(format!("{key} must be true or false, not {v}"))),
                (_, value) => {
                    let many = arg.get_value_delimiter().is_some() || matches!(arg.get_action(), ArgAction::Append);
                    let items = match value {
                        Value::Array(items) if many => items.clone(),
                        Value::Array(_) => return Err(err(format!("{key} takes one value, not a list"))),
                        v => vec![v.clone()],
                    };
                    for item in items {
                        let text = match item {
                            Value::String(s) => s,
                            Value::Integer(i) => i.to_string(),
                            Value::Float(f) => f.to_string(),
                            other => return Err(err(format!("{key}: {other} is not a valid value"))),
                        };
                        let check = Command::new("check").arg(arg.clone().required(false));
                        if let Err(e) =
                            check.try_get_matches_from([OsStr::new("check"), OsStr::new(&format!("--{key}={text}"))])
                        {
                            let why = e.to_string();
                            let why = why.lines().next().unwrap_or_default().trim_start_matches("error: ");
                            return Err(err(format!("{key}: {why}")));
                        }
                        out.push(format!("--{key}={text}"));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Flag names whose values are secrets: shown masked.
const SECRETS: [&str; 4] = ["secret", "publish-key", "token-secret", "webhook-secret"];

/// The effective settings of `pushwire ROLE` (`matches` of that subcommand, parsed from the
/// file's flags alone), one `key = value` line each with where the value came from; secrets
/// masked, broker URLs without passwords.
pub fn describe(cmd: &Command, matches: &ArgMatches) -> String {
    let mut out = String::new();
    for arg in cmd.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else { continue };
        if matches!(long, "help" | "version" | "config" | "log-level") {
            continue;
        }
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "file",
            Some(ValueSource::EnvVariable) => "environment",
            Some(ValueSource::DefaultValue) => "default",
            _ => "unset",
        };
        let values: Vec<String> =
            matches.get_raw(id).map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect()).unwrap_or_default();
        let flag = matches!(arg.get_action(), ArgAction::SetTrue);
        let shown = match (long, values.is_empty()) {
            (_, true) => "(none)".to_owned(),
            (l, false) if SECRETS.contains(&l) => "\"***\"".to_owned(),
            ("broker", false) => {
                let url = values.join(",");
                format!("{:?}", url.parse::<crate::broker::BrokerUrl>().map_or(url, |u| u.to_string()))
            }
            (_, false) if flag => values.join(""),
            (_, false) => {
                let show = |v: &String| if v.parse::<f64>().is_ok() { v.clone() } else { format!("{v:?}") };
                let shown: Vec<String> = values.iter().map(show).collect();
                if values.len() > 1 {
                    format!("[{}]", shown.join(", "))
                } else {
                    shown.join("")
                }
            }
        };
        out.push_str(&format!("{long} = {shown}  # {source}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_and_lines() {
        let text = "# pushwire\n[gateway]\nworkers = 4\norigins = [\"a\", \"b\"]\n\n[publisher]\npublish-key = \"k\"\n";
        let f = File::parse("p.toml", text).unwrap();
        let g = &f.sections["gateway"];
        assert_eq!((g[0].key.as_str(), g[0].line, &g[0].value), ("workers", 3, &Value::Integer(4)));
        assert_eq!(g[1].line, 4);
        assert_eq!(f.sections["publisher"][0].line, 7);
        let e = File::parse("p.toml", "[gateway]\nworkers = \n").unwrap_err().to_string();
        assert!(e.starts_with("p.toml:2:"), "{e}");
        let e = File::parse("p.toml", "[gateway]\nworkers = 1\n[gatway]\nx = 1\n").unwrap_err().to_string();
        assert!(e.starts_with("p.toml:3:") && e.contains("unknown section [gatway]"), "{e}");
        assert!(File::parse("p.toml", "workers = 4\n").unwrap_err().to_string().starts_with("p.toml:1:"));
    }
}
