"""interplab.toy"""
