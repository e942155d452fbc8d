"""The message bus: versioned wire messages, the Bus contract, MQTT and in-memory buses.

``messages`` (what travels, validated at the edge), ``base`` (the Bus ABC and its contracts),
``mqtt`` (MqttBus on aiomqtt, MQTT 5), ``memory`` (MemoryBroker/MemoryBus for unit tests).
"""

from ftd.bus.base import Bus, BusStats
from ftd.bus.memory import MemoryBroker, MemoryBus
from ftd.bus.messages import (
    COMMAND_OPS,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    TOPIC_EVENTS,
    Command,
    CommandResult,
    Event,
    Freshness,
    Heartbeat,
    HostRecord,
    Message,
    Namespace,
    Verdict,
    VmState,
    encode,
    parse,
    register_kind,
    topic_cmd,
    topic_group,
    topic_hb,
    topic_host,
    topic_matches,
    topic_vm_state,
)
from ftd.bus.mqtt import BrokerUrl, MqttBus, backoff_delay, parse_broker_url

__all__ = [
    "COMMAND_OPS",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "TOPIC_EVENTS",
    "BrokerUrl",
    "Bus",
    "BusStats",
    "Command",
    "CommandResult",
    "Event",
    "Freshness",
    "Heartbeat",
    "HostRecord",
    "MemoryBroker",
    "MemoryBus",
    "Message",
    "MqttBus",
    "Namespace",
    "Verdict",
    "VmState",
    "backoff_delay",
    "encode",
    "parse",
    "parse_broker_url",
    "register_kind",
    "topic_cmd",
    "topic_group",
    "topic_hb",
    "topic_host",
    "topic_matches",
    "topic_vm_state",
]
