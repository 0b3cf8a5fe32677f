//! Retained messages: the last retained message of every topic.

use crate::FastMap;
use std::sync::{Arc, RwLock};

use ntex::util::ByteString;

use crate::message::Message;
use crate::topic;

/// Retained messages of this node, by topic.
#[derive(Debug, Default)]
pub struct RetainStore {
    messages: RwLock<FastMap<ByteString, Arc<Message>>>,
}

impl RetainStore {
    /// Stores a retained message; an empty payload clears the topic. Returns
    /// the number of retained messages held afterwards.
    pub fn set(&self, msg: &Arc<Message>) -> usize {
        let mut map = self.messages.write().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            map.remove(&msg.topic);
        } else {
            map.insert(msg.topic.clone(), msg.clone());
        }
        map.len()
    }

    /// A copy from another node: stored unless this node holds a newer
    /// message for the topic (the last publish wins, by its time).
    pub fn set_if_newer(&self, msg: &Arc<Message>) -> usize {
        let mut map = self.messages.write().unwrap_or_else(|e| e.into_inner());
        if map.get(&msg.topic).is_some_and(|m| m.ts_ms > msg.ts_ms) {
            return map.len();
        }
        if msg.payload.is_empty() {
            map.remove(&msg.topic);
        } else {
            map.insert(msg.topic.clone(), msg.clone());
        }
        map.len()
    }

    /// Retained messages whose topic matches a (non-shared) filter.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let map = self.messages.read().unwrap_or_else(|e| e.into_inner());
        map.values()
            .filter(|m| topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.messages
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
