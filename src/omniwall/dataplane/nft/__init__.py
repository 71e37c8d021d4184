"""dataplane/nft"""
