"""interplab.routing"""
