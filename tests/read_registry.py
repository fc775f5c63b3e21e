"""Read a topic's committed Avro values through the schema registry with Confluent's own
deserializer, for sluice's Kafka-sink tests: one JSON object per record on stdout.

usage: read_registry.py BOOTSTRAP REGISTRY_URL TOPIC COUNT
Stops after COUNT records or 20 s without one.
"""

import json
import sys
import time

from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main():
    bootstrap, url, topic, count = sys.argv[1:5]
    count = int(count)
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": url}))
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{topic}-{time.time()}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen, last = 0, time.time()
    while seen < count and time.time() - last < 20:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        last = time.time()
        value = deserialize(msg.value(), SerializationContext(topic, MessageField.VALUE))
        print(json.dumps(value))
        seen += 1
    consumer.close()


if __name__ == "__main__":
    main()
