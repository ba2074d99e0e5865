//! What the nodes write to Redis and to each other: key names, the stored placement, the
//! messages on the channel, and the Lua that claims a key. Pure text formats, so every node of
//! every version in a cluster reads them the same way (fields are tab-separated: names are
//! refused if they hold a tab or a line break, see `config::validate`).

use std::net::IpAddr;

/// A client's placement as Redis holds it (value of its stick key): the backend's *name* (ids
/// are local to a node), when it was placed (Unix ms, the writer's wall clock) and which node
/// placed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub backend: String,
    pub created_ms: u64,
    pub node: String,
}

impl Placement {
    pub fn encode(&self) -> String {
        format!("{}\t{}\t{}", self.backend, self.created_ms, self.node)
    }

    pub fn decode(text: &str) -> Option<Placement> {
        let mut fields = text.split('\t');
        let backend = fields.next()?.to_string();
        let created_ms = fields.next()?.parse().ok()?;
        let node = fields.next()?.to_string();
        if backend.is_empty() || fields.next().is_some() {
            return None;
        }
        Some(Placement {
            backend,
            created_ms,
            node,
        })
    }
}

/// Key names under a cluster's prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// `PREFIX:stick:SERVICE:CLIENT`, CLIENT being the masked address (`198.18.1.0`,
    /// `2001:db8:1:2::`): the same on every node, whose services have the same mask.
    pub fn stick(&self, service: &str, client: IpAddr) -> String {
        format!("{}:stick:{service}:{client}", self.prefix)
    }

    /// The part of a stick key before the client.
    pub fn stick_head(&self, service: &str) -> String {
        format!("{}:stick:{service}:", self.prefix)
    }

    /// A `SCAN MATCH` pattern for every stick key of `service` (glob characters in the name
    /// escaped).
    pub fn stick_pattern(&self, service: &str) -> String {
        every_key_under(&self.stick_head(service))
    }

    /// `PREFIX:token:SERVICE:TOKEN`: the backend a session token of a `stick.token` service is
    /// placed on (the token as the client sends it).
    pub fn token(&self, service: &str, token: &str) -> String {
        format!("{}:token:{service}:{token}", self.prefix)
    }

    /// The part of a token key before the token.
    pub fn token_head(&self, service: &str) -> String {
        format!("{}:token:{service}:", self.prefix)
    }

    /// A `SCAN MATCH` pattern for every token key of `service`.
    pub fn token_pattern(&self, service: &str) -> String {
        every_key_under(&self.token_head(service))
    }

    /// The operator log: `--all-nodes` commands, a Redis stream (`XADD ... MAXLEN ~`).
    pub fn operator_log(&self) -> String {
        format!("{}:operator", self.prefix)
    }

    /// The channel every node publishes to and subscribes to.
    pub fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }
}

/// A `SCAN MATCH` pattern for every key that starts with `head` (its glob characters escaped).
fn every_key_under(head: &str) -> String {
    let mut pattern = String::new();
    for c in head.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// What one node tells the others on the channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `client` of `service` is placed as `placement` says, for `ttl_ms` more.
    Placed {
        node: String,
        service: String,
        client: IpAddr,
        placement: Placement,
        ttl_ms: u64,
    },
    /// Entries in use on the sender, whose keys it just refreshed: (client, backend, placed at
    /// Unix ms). Every node keeps its own entries of them alive as long (a client whose
    /// connections all reach one node must not expire on the others).
    Refreshed {
        node: String,
        service: String,
        ttl_ms: u64,
        entries: Vec<(IpAddr, String, u64)>,
    },
    /// An operator deleted the client's entry (`table delete`).
    Deleted {
        node: String,
        service: String,
        client: IpAddr,
    },
    /// An operator flushed the service's entries (`table flush`).
    Flushed { node: String, service: String },
    /// An operator command given with `--all-nodes` (the control request as JSON), with its id
    /// in the operator log (`PREFIX:operator`, a stream): a node that was away reads what it
    /// missed from the log, and applies each command once.
    Operator {
        node: String,
        id: String,
        request: String,
    },
}

impl Message {
    pub fn node(&self) -> &str {
        match self {
            Message::Placed { node, .. }
            | Message::Refreshed { node, .. }
            | Message::Deleted { node, .. }
            | Message::Flushed { node, .. }
            | Message::Operator { node, .. } => node,
        }
    }

    pub fn encode(&self) -> String {
        match self {
            Message::Placed {
                node,
                service,
                client,
                placement,
                ttl_ms,
            } => format!(
                "{}{}\t{ttl_ms}",
                placed_head(node, service, *client),
                placement.encode()
            ),
            Message::Refreshed {
                node,
                service,
                ttl_ms,
                entries,
            } => {
                let mut text = format!("refreshed\t{node}\t{service}\t{ttl_ms}");
                for (client, backend, created_ms) in entries {
                    text += &format!("\t{client}\t{backend}\t{created_ms}");
                }
                text
            }
            Message::Deleted {
                node,
                service,
                client,
            } => format!("deleted\t{node}\t{service}\t{client}"),
            Message::Flushed { node, service } => format!("flushed\t{node}\t{service}"),
            Message::Operator { node, id, request } => {
                format!("operator\t{node}\t{id}\t{request}")
            }
        }
    }

    pub fn decode(text: &str) -> Option<Message> {
        let (kind, rest) = text.split_once('\t')?;
        let (node, rest) = rest.split_once('\t')?;
        let node = node.to_string();
        match kind {
            "placed" => {
                let fields: Vec<&str> = rest.split('\t').collect();
                let [service, client, backend, created_ms, placed_by, ttl_ms] = fields[..] else {
                    return None;
                };
                Some(Message::Placed {
                    node,
                    service: service.to_string(),
                    client: client.parse().ok()?,
                    placement: Placement {
                        backend: backend.to_string(),
                        created_ms: created_ms.parse().ok()?,
                        node: placed_by.to_string(),
                    },
                    ttl_ms: ttl_ms.parse().ok()?,
                })
            }
            "refreshed" => {
                let mut fields = rest.split('\t');
                let service = fields.next()?.to_string();
                let ttl_ms = fields.next()?.parse().ok()?;
                let rest: Vec<&str> = fields.collect();
                if !rest.len().is_multiple_of(3) {
                    return None;
                }
                let entries = rest
                    .chunks(3)
                    .map(|e| Some((e[0].parse().ok()?, e[1].to_string(), e[2].parse().ok()?)))
                    .collect::<Option<Vec<_>>>()?;
                Some(Message::Refreshed {
                    node,
                    service,
                    ttl_ms,
                    entries,
                })
            }
            "deleted" => {
                let (service, client) = rest.split_once('\t')?;
                Some(Message::Deleted {
                    node,
                    service: service.to_string(),
                    client: client.parse().ok()?,
                })
            }
            "flushed" => Some(Message::Flushed {
                node,
                service: rest.to_string(),
            }),
            "operator" => {
                let (id, request) = rest.split_once('\t')?;
                Some(Message::Operator {
                    node,
                    id: id.to_string(),
                    request: request.to_string(),
                })
            }
            _ => None,
        }
    }
}

/// A Redis stream entry id (`MS-SEQ`) as a pair that orders like the ids.
pub fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The start of a `placed` message, to which the claim script appends the placement and TTL.
pub fn placed_head(node: &str, service: &str, client: IpAddr) -> String {
    format!("placed\t{node}\t{service}\t{client}\t")
}

/// Claims a stick key, first writer wins (a script, so the check and the write are one step
/// for Redis). KEYS[1]: the stick key. ARGV: 1 the placement, 2 its TTL (ms), 3 the backend the
/// client was moved off ('' for a new entry), 4 the channel, 5 the message head.
///
/// A new entry is written only if the key is absent (`SET NX`). A redispatch replaces the key
/// only if it still names the backend the client moved off (or is absent): if another node
/// redispatched first, its choice stands. A write is published to the other nodes. Returns nil
/// when this claim won, otherwise the placement that stands.
pub const CLAIM_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  local backend = string.match(current, '^[^\t]*')
  if ARGV[3] == '' or backend ~= ARGV[3] then
    return current
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ARGV[1] .. '\t' .. ARGV[2])
return false
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_and_messages_read_back_as_written() {
        let placement = Placement {
            backend: "b2".into(),
            created_ms: 1_764_000_000_123,
            node: "lb1".into(),
        };
        assert_eq!(
            Placement::decode(&placement.encode()),
            Some(placement.clone())
        );
        for message in [
            Message::Placed {
                node: "lb1".into(),
                service: "shop".into(),
                client: "2001:db8:1:2::".parse().unwrap(),
                placement: placement.clone(),
                ttl_ms: 1_800_000,
            },
            Message::Deleted {
                node: "lb2".into(),
                service: "shop".into(),
                client: "198.18.1.7".parse().unwrap(),
            },
            Message::Flushed {
                node: "lb3".into(),
                service: "shop".into(),
            },
            Message::Refreshed {
                node: "lb2".into(),
                service: "shop".into(),
                ttl_ms: 1_800_000,
                entries: vec![
                    ("198.18.1.7".parse().unwrap(), "b1".into(), 17),
                    ("198.18.1.9".parse().unwrap(), "b3".into(), 19),
                ],
            },
            Message::Operator {
                node: "lb1".into(),
                id: "1764000000000-0".into(),
                request: r#"{"command":"backend","service":"shop"}"#.into(),
            },
        ] {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
    }

    #[test]
    fn the_claim_scripts_message_is_a_placed_message() {
        // What CLAIM_SCRIPT publishes: head .. placement .. '\t' .. ttl.
        let client: IpAddr = "198.18.1.0".parse().unwrap();
        let placement = Placement {
            backend: "b1".into(),
            created_ms: 5,
            node: "lb2".into(),
        };
        let text = format!(
            "{}{}\t{}",
            placed_head("lb2", "shop", client),
            placement.encode(),
            30_000
        );
        assert_eq!(
            Message::decode(&text),
            Some(Message::Placed {
                node: "lb2".into(),
                service: "shop".into(),
                client,
                placement,
                ttl_ms: 30_000
            })
        );
    }

    #[test]
    fn stream_ids_order_by_time_then_sequence() {
        assert!(stream_id("1764000000000-1") > stream_id("1764000000000-0"));
        assert!(stream_id("1764000000001-0") > stream_id("1764000000000-9"));
        assert_eq!(stream_id("12-3"), Some((12, 3)));
        assert_eq!(stream_id("12"), None);
        assert_eq!(stream_id("a-1"), None);
    }

    #[test]
    fn garbage_is_no_message() {
        for text in [
            "",
            "placed",
            "placed\tlb1\tshop\tnot-an-address\tb1\t5\tlb1\t100",
            "placed\tlb1\tshop\t198.18.1.1\tb1\tfive\tlb1\t100",
            "placed\tlb1\tshop\t198.18.1.1\tb1\t5\tlb1",
            "renamed\tlb1\tshop",
        ] {
            assert_eq!(Message::decode(text), None, "{text:?}");
        }
        assert_eq!(Placement::decode("\t5\tlb1"), None);
        assert_eq!(Placement::decode("b1\t5"), None);
    }

    #[test]
    fn scan_patterns_escape_glob_characters() {
        let keys = Keys::new("slb");
        assert_eq!(keys.stick_pattern("shop"), "slb:stick:shop:*");
        assert_eq!(keys.stick_pattern("a*b[1]"), "slb:stick:a\\*b\\[1\\]:*");
        assert_eq!(
            keys.stick("shop", "198.18.1.0".parse().unwrap()),
            "slb:stick:shop:198.18.1.0"
        );
        assert_eq!(keys.token_pattern("a?b"), "slb:token:a\\?b:*");
        assert_eq!(keys.token("shop", "x*y"), "slb:token:shop:x*y");
        assert!(
            keys.token("shop", "t")
                .starts_with(&keys.token_head("shop"))
        );
    }
}
