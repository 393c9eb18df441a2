"""interplab.cli"""
