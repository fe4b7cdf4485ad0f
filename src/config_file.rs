//! The optional TOML file of `imagelsh serve --config FILE` (or `IMAGELSH_CONFIG`).
//!
//! Precedence, highest first: command-line flags, `IMAGELSH_*` variables, the file, built-in
//! defaults. The file's keys are the flags' long names (`listen = "0.0.0.0:50051"`,
//! `cache-mb = 1024`; `_` and `-` alike), at the top level or in tables that only group them
//! (`[limits]`). The file takes the place of the defaults: each of its values becomes its
//! flag's default, so that a variable or a flag still overrides it, as for any default. A key
//! that names no flag is an error, so that a typo does not go unnoticed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// The flag that names the file, and its variable.
pub const CONFIG_FLAG: &str = "config";
pub const CONFIG_ENV: &str = "IMAGELSH_CONFIG";
/// Flags the file cannot set: the file itself, and what only makes sense typed.
const NOT_IN_FILE: [&str; 4] = ["config", "print-config", "help", "version"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("configuration file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error(
        "configuration file {path}: {key:?} is not a setting of `imagelsh {command}` (see `imagelsh {command} --help`)"
    )]
    UnknownKey { path: PathBuf, command: String, key: String },
    #[error("configuration file {path}: {key:?} cannot be set in a file")]
    NotSettable { path: PathBuf, key: String },
    #[error("configuration file {path}: {key:?} has a value of a kind no flag takes ({kind})")]
    BadValue { path: PathBuf, key: String, kind: &'static str },
}

/// One setting from the file: the flag's argument id and its values as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSetting {
    pub id: String,
    pub values: Vec<String>,
}

/// The file `--config` or `IMAGELSH_CONFIG` names for `subcommand`, read from the command line
/// before it is parsed (the file changes how it is parsed).
pub fn config_path(args: &[OsString], subcommand: &str) -> Option<PathBuf> {
    let mut words = args.iter().skip(1).map(|a| a.to_string_lossy().into_owned());
    if !words.by_ref().any(|w| w == subcommand) {
        return None;
    }
    let flag = format!("--{CONFIG_FLAG}");
    let prefix = format!("--{CONFIG_FLAG}=");
    let mut found = None;
    while let Some(word) = words.next() {
        if word == "--" {
            break;
        }
        if word == flag {
            found = words.next().map(PathBuf::from);
        } else if let Some(path) = word.strip_prefix(&prefix) {
            found = Some(PathBuf::from(path));
        }
    }
    found.or_else(|| std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
}

/// Reads `path` and matches its keys with the flags of `command`.
pub fn read_settings(path: &Path, command: &Command) -> Result<Vec<FileSetting>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read { path: path.into(), source })?;
    parse_settings(&text, path, command)
}

pub fn parse_settings(text: &str, path: &Path, command: &Command) -> Result<Vec<FileSetting>, ConfigFileError> {
    let table: toml::Table = toml::from_str(text)
        .map_err(|source| ConfigFileError::Parse { path: path.into(), source: Box::new(source) })?;
    let mut flat = Vec::new();
    flatten(&table, path, &mut flat)?;
    flat.into_iter()
        .map(|(key, values)| {
            let long = key.replace('_', "-");
            if NOT_IN_FILE.contains(&long.as_str()) {
                return Err(ConfigFileError::NotSettable { path: path.into(), key });
            }
            let arg = command.get_arguments().find(|a| a.get_long() == Some(long.as_str())).ok_or_else(|| {
                ConfigFileError::UnknownKey { path: path.into(), command: command.get_name().to_string(), key }
            })?;
            Ok(FileSetting { id: arg.get_id().to_string(), values })
        })
        .collect()
}

/// Keys and their values as text; tables only group keys.
fn flatten(table: &toml::Table, path: &Path, out: &mut Vec<(String, Vec<String>)>) -> Result<(), ConfigFileError> {
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => flatten(inner, path, out)?,
            toml::Value::Array(items) => {
                let values = items.iter().map(|v| scalar(key, v, path)).collect::<Result<_, _>>()?;
                out.push((key.clone(), values));
            }
            other => out.push((key.clone(), vec![scalar(key, other, path)?])),
        }
    }
    Ok(())
}

fn scalar(key: &str, value: &toml::Value, path: &Path) -> Result<String, ConfigFileError> {
    let bad = |kind| ConfigFileError::BadValue { path: path.into(), key: key.into(), kind };
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(_) => Err(bad("a date")),
        toml::Value::Array(_) => Err(bad("an array inside an array")),
        toml::Value::Table(_) => Err(bad("a table inside an array")),
    }
}

/// `command` with the file's settings as its flags' defaults.
pub fn with_settings(mut command: Command, settings: &[FileSetting]) -> Command {
    for setting in settings {
        let values: Vec<clap::builder::OsStr> = setting.values.iter().map(|v| v.clone().into()).collect();
        command = command.mut_arg(setting.id.as_str(), |arg| arg.default_values(values));
    }
    command
}

/// Every setting of `command` as parsed into `matches`, one TOML line each with where its
/// value came from; `file_ids` are the settings the file gave.
pub fn render_effective(command: &Command, matches: &ArgMatches, file_ids: &[String]) -> String {
    let mut lines = Vec::new();
    for arg in command.get_arguments() {
        let (id, Some(long)) = (arg.get_id().as_str(), arg.get_long()) else { continue };
        if NOT_IN_FILE.contains(&long) {
            continue;
        }
        let Ok(Some(raw)) = matches.try_get_raw(id) else {
            lines.push(format!("# {long} = (unset)\n"));
            continue;
        };
        let values: Vec<String> = raw.map(|v| toml_value(&v.to_string_lossy())).collect();
        let value = match values.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "flag".to_string(),
            Some(ValueSource::EnvVariable) => {
                format!("env {}", arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default())
            }
            _ if file_ids.iter().any(|f| f == id) => "file".to_string(),
            _ => "default".to_string(),
        };
        lines.push(format!("{long} = {value}  # {source}\n"));
    }
    // By name, whatever order the flags were declared in: easier to find one.
    lines.sort_by(|a, b| a.trim_start_matches("# ").cmp(b.trim_start_matches("# ")));
    let mut out =
        String::from("# imagelsh serve: the effective configuration (flags > IMAGELSH_* > file > defaults)\n");
    out.extend(lines);
    out
}

/// A value as TOML: numbers and booleans bare, the rest a quoted string.
fn toml_value(text: &str) -> String {
    let number =
        text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() || text.parse::<f64>().is_ok_and(f64::is_finite);
    if text == "true" || text == "false" || (number && !text.starts_with(['+', '.']) && !text.ends_with('.')) {
        return text.to_string();
    }
    toml::Value::String(text.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn serve() -> Command {
        Command::new("serve")
            .arg(Arg::new("listen").long("listen").default_value("127.0.0.1:50051"))
            .arg(Arg::new("cache_mb").long("cache-mb").default_value("512").value_parser(clap::value_parser!(u64)))
            .arg(Arg::new("fsync").long("fsync").default_value("true").action(ArgAction::Set))
            .arg(Arg::new("no_model").long("no-model").action(ArgAction::SetTrue))
            .arg(Arg::new("config").long("config"))
    }

    fn settings(text: &str) -> Result<Vec<FileSetting>, ConfigFileError> {
        parse_settings(text, Path::new("test.toml"), &serve())
    }

    #[test]
    fn keys_are_long_flag_names_at_the_top_or_in_grouping_tables() {
        let got = settings("listen = \"0.0.0.0:1\"\n[storage]\ncache_mb = 64\nno-model = true\n").unwrap();
        let ids: Vec<&str> = got.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["listen", "cache_mb", "no_model"]);
        assert_eq!(got[1].values, ["64"]);
    }

    #[test]
    fn unknown_keys_and_the_config_key_are_refused() {
        assert!(matches!(settings("lisen = \"x\""), Err(ConfigFileError::UnknownKey { key, .. }) if key == "lisen"));
        assert!(matches!(settings("config = \"x\""), Err(ConfigFileError::NotSettable { .. })));
        assert!(matches!(settings("listen = 1979-05-27"), Err(ConfigFileError::BadValue { .. })));
        assert!(matches!(settings("listen = "), Err(ConfigFileError::Parse { .. })));
    }

    #[test]
    fn the_file_replaces_defaults_and_a_flag_still_wins() {
        let file = settings("listen = \"0.0.0.0:1\"\ncache-mb = 64\nfsync = false\nno-model = true\n").unwrap();
        let command = with_settings(serve(), &file);
        let matches = command.clone().try_get_matches_from(["serve", "--cache-mb", "8"]).unwrap();
        assert_eq!(matches.get_one::<String>("listen").map(String::as_str), Some("0.0.0.0:1"));
        assert_eq!(matches.get_one::<u64>("cache_mb"), Some(&8));
        assert_eq!(matches.get_one::<String>("fsync").map(String::as_str), Some("false"));
        assert_eq!(matches.get_one::<bool>("no_model"), Some(&true));
        let ids: Vec<String> = file.iter().map(|s| s.id.clone()).collect();
        let text = render_effective(&command, &matches, &ids);
        assert!(text.contains("listen = \"0.0.0.0:1\"  # file\n"), "{text}");
        assert!(text.contains("cache-mb = 8  # flag\n"), "{text}");
        assert!(text.contains("no-model = true  # file\n"), "{text}");
        let printed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(printed["cache-mb"].as_integer(), Some(8), "the output is itself a config file");
    }

    #[test]
    fn the_path_comes_from_the_subcommands_flag() {
        let args = |words: &[&str]| words.iter().map(OsString::from).collect::<Vec<_>>();
        let path = config_path(&args(&["imagelsh", "serve", "--listen", "x", "--config", "a.toml"]), "serve");
        assert_eq!(path, Some(PathBuf::from("a.toml")));
        let path = config_path(&args(&["imagelsh", "serve", "--config=b.toml"]), "serve");
        assert_eq!(path, Some(PathBuf::from("b.toml")));
        assert_eq!(config_path(&args(&["imagelsh", "query", "--config", "a.toml"]), "serve"), None);
    }
}
