//! Operators' actions across the cluster: an admin request on any node
//! reaches the sessions of every node.
//!
//! Each node answers requests on `<stream>.ctl.all` (see `subjects`): list
//! your sessions or rooms, kick a user, kick a session. The asking node publishes
//! one request with a reply inbox and gathers one answer per other live
//! node, until it has them all or `request_timeout_ms` passes: a node that
//! does not answer in time is left out of the answer, never waited for. It
//! acts on sessions only through the hub's registry, as the local admin
//! API does, so every close path keeps its guarantees.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::subjects;
use crate::close::CloseReason;
use crate::hub::{Hub, SessionId, SessionInfo};

/// A request to the other nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// List your sessions.
    Sessions,
    /// List the rooms you have members in.
    Rooms,
    /// Your sessions and users in `room`.
    Room { room: String },
    /// Close every session of `user` with 4009.
    KickUser { user: String },
    /// Close session `session` with 4009, if it is yours.
    KickSession { session: SessionId },
}

/// One node's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub node: String,
    /// Sessions closed (kicks).
    #[serde(default)]
    pub kicked: usize,
    /// The node's sessions (`Sessions`).
    #[serde(default)]
    pub sessions: Vec<NodeSession>,
    /// The node's rooms (`Rooms`).
    #[serde(default)]
    pub rooms: Vec<NodeRoom>,
    /// The room asked for (`Room`), if the node has members in it.
    #[serde(default)]
    pub room: Option<NodeRoomMembers>,
}

/// A room's members on another node: its sessions there, and the room's
/// users as that node sees them (its own and the other nodes').
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRoomMembers {
    pub sessions: usize,
    pub users: Vec<String>,
}

/// A room as another node reports it: its sessions there, and the room's
/// users as that node counts them (its own and the other nodes').
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRoom {
    pub name: String,
    pub sessions: usize,
    pub users: usize,
}

/// A session as another node reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSession {
    pub id: SessionId,
    pub user: String,
    pub remote: String,
    pub connected_at_ms: u64,
    pub rooms: Vec<String>,
    pub messages_in: u64,
    pub messages_out: u64,
    pub queued_bytes: usize,
}

impl From<SessionInfo> for NodeSession {
    fn from(s: SessionInfo) -> NodeSession {
        NodeSession {
            id: s.id,
            user: s.user,
            remote: s.remote.to_string(),
            connected_at_ms: s.connected_at_ms,
            rooms: s.rooms,
            messages_in: s.messages_in,
            messages_out: s.messages_out,
            queued_bytes: s.queued_bytes,
        }
    }
}

/// Why a request to the other nodes failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot subscribe to the reply inbox")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error("cannot publish the request")]
    Publish(#[source] async_nats::PublishError),
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
}

/// This node's end of the control plane.
#[derive(Debug, Clone)]
pub struct Control {
    client: async_nats::Client,
    subject: String,
    node: Arc<str>,
    timeout: Duration,
}

impl Control {
    /// Starts answering the other nodes' requests on `tracker` until `stop`.
    pub fn start(
        client: async_nats::Client,
        stream: &str,
        node: &str,
        timeout: Duration,
        hub: Arc<Hub>,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Control {
        let control = Control {
            client,
            subject: subjects::control(stream, "all"),
            node: Arc::from(node),
            timeout,
        };
        tracker.spawn(control.clone().answer(hub, stop));
        control
    }

    /// Answers requests until `stop`; re-subscribes if the subscription
    /// ends (it survives reconnects; this covers a server-side close).
    async fn answer(self, hub: Arc<Hub>, stop: CancellationToken) {
        loop {
            let mut sub = match self.client.subscribe(self.subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "control plane: cannot subscribe; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(self.timeout) => continue,
                    }
                }
            };
            loop {
                let msg = tokio::select! {
                    () = stop.cancelled() => return,
                    m = sub.next() => m,
                };
                let Some(msg) = msg else { break };
                let Some(reply_to) = msg.reply else { continue };
                let from_self = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(NODE_HEADER))
                    .is_some_and(|n| n.as_str() == &*self.node);
                if from_self {
                    continue;
                }
                let request: Request = match serde_json::from_slice(&msg.payload) {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(error = %e, "control plane: undecodable request");
                        continue;
                    }
                };
                let reply = self.handle(&hub, request);
                match serde_json::to_vec(&reply) {
                    Ok(body) => {
                        if let Err(e) = self.client.publish(reply_to, body.into()).await {
                            debug!(error = %e, "control plane: cannot reply");
                        }
                    }
                    Err(e) => warn!(error = %e, "control plane: cannot encode a reply"),
                }
            }
        }
    }

    fn handle(&self, hub: &Hub, request: Request) -> Reply {
        let mut reply = Reply {
            node: self.node.to_string(),
            kicked: 0,
            sessions: Vec::new(),
            rooms: Vec::new(),
            room: None,
        };
        match request {
            Request::Sessions => {
                reply.sessions = hub.sessions().into_iter().map(NodeSession::from).collect();
            }
            Request::Rooms => {
                reply.rooms = (hub.rooms().into_iter())
                    .map(|r| NodeRoom {
                        name: r.name,
                        sessions: r.sessions,
                        users: r.users.len(),
                    })
                    .collect();
            }
            Request::Room { room } => {
                reply.room = hub.room(&room).map(|r| NodeRoomMembers {
                    sessions: r.sessions,
                    users: r.users,
                });
            }
            Request::KickUser { user } => {
                reply.kicked = hub.close_user(&user, CloseReason::Kicked);
            }
            Request::KickSession { session } => {
                reply.kicked = usize::from(hub.close_session(session, CloseReason::Kicked));
            }
        }
        reply
    }

    /// Sends `request` to every other node and gathers the answers of
    /// `expected` of them (the other live nodes), or those that came
    /// within the timeout.
    pub async fn gather(
        &self,
        request: &Request,
        expected: usize,
    ) -> Result<Vec<Reply>, ControlError> {
        if expected == 0 {
            return Ok(Vec::new());
        }
        let body = serde_json::to_vec(request).map_err(ControlError::Encode)?;
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(ControlError::Subscribe)?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NODE_HEADER, &*self.node);
        self.client
            .publish_with_reply_and_headers(self.subject.clone(), inbox, headers, body.into())
            .await
            .map_err(ControlError::Publish)?;
        let mut replies = Vec::new();
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        while replies.len() < expected {
            let msg = tokio::select! {
                () = &mut deadline => break,
                m = sub.next() => m,
            };
            let Some(msg) = msg else { break };
            match serde_json::from_slice::<Reply>(&msg.payload) {
                Ok(r) => replies.push(r),
                Err(e) => debug!(error = %e, "control plane: undecodable reply"),
            }
        }
        Ok(replies)
    }
}

/// The header naming the node that asks, so it does not answer itself.
const NODE_HEADER: &str = "Sb-Node";
