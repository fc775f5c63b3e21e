"""Produce records through the schema registry with Confluent's own serializers
(confluent-kafka's AvroSerializer and ProtobufSerializer), for sluice's registry tests.

usage: produce_registry.py BOOTSTRAP REGISTRY_URL TOPIC avro|protobuf FIRST COUNT VERSION
       produce_registry.py BOOTSTRAP REGISTRY_URL TOPIC debezium FILE

The second form reads change events as JSON lines `[key, event or null]` (Debezium's JSON
shape) and writes them in Debezium's Avro shape (an `Envelope` record of `before`,
`after`, `source`, `op`, `ts_ms`), a null event as a tombstone.

Records carry ids FIRST..FIRST+COUNT-1, keyed by the id. VERSION 1 writes the first
schema; VERSION 2 an evolution of it (a field added with a default), registered as the
subject's next version, so a reader meets a new schema id mid-stream.
"""

import sys

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

AVRO = {
    1: """{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"id","type":"long"},
        {"name":"customer","type":{"type":"record","name":"Customer","fields":[{"name":"name","type":"string"}]}},
        {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
        {"name":"at","type":{"type":"long","logicalType":"timestamp-micros"}}]}""",
    2: """{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"id","type":"long"},
        {"name":"customer","type":{"type":"record","name":"Customer","fields":[{"name":"name","type":"string"}]}},
        {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
        {"name":"at","type":{"type":"long","logicalType":"timestamp-micros"}},
        {"name":"tier","type":["null","string"],"default":null}]}""",
}


def avro_serializer(registry, version):
    return AvroSerializer(registry, AVRO[version], lambda obj, ctx: obj)


def avro_record(i, version):
    from decimal import Decimal
    import datetime

    at = datetime.datetime.fromtimestamp(1_700_000_000 + i, tz=datetime.timezone.utc) + datetime.timedelta(
        microseconds=123
    )
    rec = {"id": i, "customer": {"name": f"c{i}"}, "price": Decimal(i * 101) / 100, "at": at}
    if version == 2:
        rec["tier"] = "gold" if i % 2 else None
    return rec


def proto_class(version):
    """The Order message class, built from a descriptor (no protoc needed)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name=f"order_v{version}.proto", package="shop", syntax="proto3")
    fdp.dependency.append("google/protobuf/timestamp.proto")
    customer = fdp.message_type.add(name="Customer")
    customer.field.add(name="name", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    order = fdp.message_type.add(name="Order")
    order.field.add(name="id", number=1, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    order.field.add(name="customer", number=2, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL, type_name=".shop.Customer")
    order.field.add(name="price", number=3, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    order.field.add(
        name="at", number=4, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL, type_name=".google.protobuf.Timestamp"
    )
    if version == 2:
        order.field.add(name="tier", number=5, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.Default()
    try:
        pool.Add(fdp)
    except TypeError:
        pass
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Order"))


DEBEZIUM = """{"type":"record","name":"Envelope","namespace":"shop.public.customers","fields":[
    {"name":"before","type":["null",{"type":"record","name":"Value","fields":[
        {"name":"id","type":"long"},{"name":"name","type":"string"},{"name":"version","type":"long"}]}],
     "default":null},
    {"name":"after","type":["null","Value"],"default":null},
    {"name":"source","type":{"type":"record","name":"Source","namespace":"io.debezium.connector.postgresql",
     "fields":[{"name":"connector","type":"string"},{"name":"ts_ms","type":"long"},
               {"name":"lsn","type":["null","long"],"default":null}]}},
    {"name":"op","type":"string"},
    {"name":"ts_ms","type":["null","long"],"default":null}]}"""


def debezium(bootstrap, url, topic, path):
    import json

    registry = SchemaRegistryClient({"url": url})
    serialize = AvroSerializer(registry, DEBEZIUM, lambda obj, ctx: obj)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    ctx = SerializationContext(topic, MessageField.VALUE)
    with open(path) as f:
        for line in f:
            key, event = json.loads(line)
            value = None
            if event is not None:
                event = event.get("payload", event) if "schema" in event else event
                src = event["source"]
                value = serialize(
                    {
                        "before": event["before"],
                        "after": event["after"],
                        "source": {"connector": src["connector"], "ts_ms": src["ts_ms"], "lsn": src["lsn"]},
                        "op": event["op"],
                        "ts_ms": event["ts_ms"],
                    },
                    ctx,
                )
            producer.produce(topic, key=key.encode(), value=value)
            producer.poll(0)
    producer.flush(60)


def main():
    if sys.argv[4] == "debezium":
        debezium(*sys.argv[1:4], sys.argv[5])
        return
    bootstrap, url, topic, fmt, first, count, version = sys.argv[1:8]
    first, count, version = int(first), int(count), int(version)
    registry = SchemaRegistryClient({"url": url})
    if fmt == "avro":
        serialize = avro_serializer(registry, version)
        make = lambda i: avro_record(i, version)
    else:
        cls = proto_class(version)
        serialize = ProtobufSerializer(cls, registry, {"use.deprecated.format": False})

        def make(i):
            m = cls(id=i, price=f"{i * 101 // 100}.{i * 101 % 100:02d}")
            m.customer.name = f"c{i}"
            m.at.seconds = 1_700_000_000 + i
            m.at.nanos = 123_000
            if version == 2:
                m.tier = "gold" if i % 2 else ""
            return m

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    ctx = SerializationContext(topic, MessageField.VALUE)
    for i in range(first, first + count):
        producer.produce(topic, key=str(i).encode(), value=serialize(make(i), ctx))
        producer.poll(0)
    producer.flush(60)


if __name__ == "__main__":
    main()
