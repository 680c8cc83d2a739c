"""The slab allocator (pure logic over a byte buffer); arrives with the allocator issue."""
