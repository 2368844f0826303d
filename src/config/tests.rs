//! Tests of the configuration: file and defaults, validation, and the
//! README's table against `Config::default()`.

use super::*;

mod file_and_defaults {
    use super::*;

    #[test]
    fn file_values_override_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("switchboard.toml");
        std::fs::write(
            &path,
            "replay_cap = 7\nplain_listen = \"127.0.0.1:8080\"\ndurability = \"none\"\n",
        )
        .expect("write");
        let config = Config::from_file(&path).expect("parses");
        assert_eq!(config.replay_cap, 7);
        assert_eq!(
            config.plain_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 8080)))
        );
        assert_eq!(config.durability, Durability::None);
        assert_eq!(
            config.max_message_bytes,
            Config::default().max_message_bytes
        );
        config.validate().expect("valid");

        std::fs::write(&path, "replay_kap = 7\n").expect("write");
        assert!(matches!(
            Config::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn dev_mode_refuses_non_loopback_addresses_and_silly_limits() {
        let config = Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            ..Config::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::DevModeNotLoopback { .. })
        ));
        let config = Config {
            max_message_bytes: 10,
            ..Config::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::TooSmall {
                field: "max_message_bytes",
                ..
            })
        ));
    }

    #[test]
    fn presence_events_off_takes_room_patterns() {
        let config = Config {
            presence_events_off: vec!["live-*".into(), "*:stage".into()],
            ..Config::default()
        };
        config.validate().expect("valid patterns");
        let config = Config {
            presence_events_off: vec!["live *".into()],
            ..Config::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::RoomPattern {
                field: "presence_events_off",
                ..
            })
        ));
    }
}

mod validate_tests {
    use super::*;

    fn auth_on() -> Config {
        Config {
            auth_hs256_secret: Some(Secret::new("x".repeat(32))),
            ..Config::default()
        }
    }

    #[test]
    fn dev_mode_refuses_a_non_loopback_admin_listener() {
        let config = Config {
            admin_listen: Some(SocketAddr::from(([0, 0, 0, 0], 19092))),
            admin_token: Some(Secret::new("a".repeat(16))),
            ..Config::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::DevModeNotLoopback {
                field: "admin_listen",
                ..
            })
        ));
    }

    #[test]
    fn a_non_loopback_admin_listener_needs_a_token() {
        let exposed = Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            admin_listen: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            ..auth_on()
        };
        assert!(matches!(
            exposed.validate(),
            Err(ConfigError::AdminExposed { .. })
        ));
        let with_token = Config {
            admin_token: Some(Secret::new("a".repeat(16))),
            ..exposed.clone()
        };
        with_token.validate().expect("a token makes it a choice");
        let loopback = Config {
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            ..exposed
        };
        loopback.validate().expect("loopback needs no token");
    }

    #[test]
    fn the_queue_cap_holds_a_user_burst_twice() {
        let config = auth_on();
        config.validate().expect("the defaults are consistent");
        let burst = config.send_rate_per_user.burst as usize;
        let small = Config {
            outbound_queue_max_bytes: 2 * burst * config.max_message_bytes - 1,
            ..config.clone()
        };
        assert!(matches!(
            small.validate(),
            Err(ConfigError::QueueCapBelowBurst { .. })
        ));
        let below_soft = Config {
            send_rate_per_user: Rate::OFF,
            outbound_queue_max_bytes: config.outbound_queue_bytes - 1,
            ..config
        };
        assert!(matches!(
            below_soft.validate(),
            Err(ConfigError::QueueCapBelowBurst { .. })
        ));
    }
}

/// README's configuration table against `Config::default()`: every default
/// it states must be the real one, so the two cannot drift apart.
mod readme_table {
    use super::*;

    /// One README row: its keys and the defaults cell, split to match.
    fn rows(readme: &str) -> Vec<(Vec<String>, String)> {
        let section = readme
            .split("## Configuration")
            .nth(1)
            .expect("README has a Configuration section");
        section
            .lines()
            .skip_while(|l| !l.starts_with("| key | default |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let keys = cells[1]
                    .split([',', '/'])
                    .map(|k| k.trim().trim_matches('`').to_owned())
                    .collect();
                (keys, cells[2].to_owned())
            })
            .collect()
    }

    /// A default cell for one key, as a TOML value; `None` for "unset".
    fn toml_value(cell: &str) -> Option<String> {
        let cell = cell.trim();
        let unset = ["off", "none", "not checked", "empty", "unset"];
        if unset.iter().any(|u| cell.starts_with(u)) {
            return None;
        }
        if let Some(text) = cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
            return Some(format!("{text:?}"));
        }
        if cell == "true" || cell == "false" {
            return Some(cell.to_owned());
        }
        assert!(
            cell.bytes().all(|b| b.is_ascii_digit()),
            "README default `{cell}` is neither a number, a boolean, a `quoted` value nor off/none/empty"
        );
        Some(cell.to_owned())
    }

    #[test]
    fn every_default_in_the_readme_table_is_the_real_one() {
        let readme = include_str!("../../README.md");
        let defaults = format!("{:?}", Config::default());
        let rows = rows(readme);
        assert!(rows.len() > 20, "the table was not found: {rows:?}");
        let mut checked = 0;
        for (keys, cell) in rows {
            if cell.starts_with("see ") {
                // Defined elsewhere (SECURITY.md): the keys must exist.
                for key in &keys {
                    let stem = key.trim_end_matches('*');
                    assert!(
                        defaults.contains(&format!(" {stem}")),
                        "README names `{key}`, which is not a config key"
                    );
                }
                continue;
            }
            let values: Vec<&str> = if keys.len() == 1 {
                vec![cell.as_str()]
            } else {
                cell.split(',').collect()
            };
            let values = if values.len() == keys.len() {
                values
            } else {
                // One value for several keys ("none (dev mode)").
                vec![cell.as_str(); keys.len()]
            };
            for (key, value) in keys.iter().zip(values) {
                match toml_value(value) {
                    Some(v) => {
                        let parsed: Config = toml::from_str(&format!("{key} = {v}"))
                            .unwrap_or_else(|e| panic!("README row `{key}` = {v}: {e}"));
                        // A `cluster.` key sets the `[cluster]` section.
                        let defaults = if key.starts_with("cluster.") {
                            let with_cluster = Config {
                                cluster: Some(ClusterConfig::default()),
                                ..Config::default()
                            };
                            format!("{with_cluster:?}")
                        } else {
                            defaults.clone()
                        };
                        assert_eq!(
                            format!("{parsed:?}"),
                            defaults,
                            "README says `{key}` defaults to {v}, Config::default() differs"
                        );
                    }
                    None => assert!(
                        defaults.contains(&format!(" {key}: None"))
                            || defaults.contains(&format!(" {key}: []")),
                        "README says `{key}` is unset by default, Config::default() sets it"
                    ),
                }
                checked += 1;
            }
        }
        assert!(checked > 30, "only {checked} defaults were checked");
    }
}
